"""`peftplan trace` and `peftplan check`: the fake-tensor ground truth, and the estimate held to it."""
from __future__ import annotations

import json
from dataclasses import asdict

import typer

from peftplan.cli import (AdapterDtype, AdapterSize, Alpha, Attention, Autocast, Dora, GradAccum, MaxGradNorm,
                          Reentrant, Batch, DoubleQuant, Dropout, Dtype, Foreach, GradCkpt, Json,
                          KbitPrep, Method, Model, Optim, Placement, R, Seq, Targets, TopK, fail, make_plan)
from peftplan.errors import PlanError


def _gib(n: float) -> str:
    return f"{n / 2**30:,.3f} GiB"


def trace_cmd(
    model: Model = "opt-125m", method: Method = "lora", r: R = 16, alpha: Alpha = 16.0, dropout: Dropout = 0.0,
    targets: Targets = None, adapter_size: AdapterSize = 64, adapter_placement: Placement = "houlsby",
    top_k: TopK = 2, batch_size: Batch = 1, seq_len: Seq = 512, dtype: Dtype = "bf16", optimizer: Optim = "adamw",
    foreach: Foreach = True, grad_checkpointing: GradCkpt = False, attention: Attention = "sdpa",
    double_quant: DoubleQuant = True, kbit_prep: KbitPrep = True, adapter_dtype: AdapterDtype = "fp32",
    dora: Dora = False, autocast: Autocast = "none", grad_accum: GradAccum = 1, max_grad_norm: MaxGradNorm = 1.0,
    use_reentrant: Reentrant = False,
    impl: str = typer.Option("auto", help="LoRA layers: peft (get_peft_model) | ours | auto (peft when installed)"),
    steps: int = typer.Option(2, help="steps to run; the last (steady-state) one is reported"),
    json_out: Json = False,
) -> None:
    """Run the real training step on fake tensors (CPU, no memory) and report the exact live-tensor peak."""
    from peftplan.planning.cards import load_card
    from peftplan.planning import estimate
    from peftplan.trace.check import compare

    try:
        plan = make_plan(method, r, alpha, dropout, targets, adapter_size, adapter_placement, top_k, batch_size,
                         seq_len, dtype, optimizer, foreach, grad_checkpointing, attention, double_quant, kbit_prep,
                         adapter_dtype=adapter_dtype, use_dora=dora, autocast=autocast, grad_accum=grad_accum,
                         max_grad_norm=max_grad_norm, use_reentrant=use_reentrant)
        card = load_card(model)
        est = None if plan.use_dora else estimate(card, plan)  # DoRA: traced, not yet estimated
        from peftplan.trace.run import trace

        tr = trace(card, plan, steps=steps, impl=impl)
    except PlanError as e:
        fail(str(e))
    except ImportError as e:
        fail(f"tracing needs torch and transformers ({e.name} is missing): pip install -e '.[torch,quant]'")
    cmp = compare(est, tr) if est is not None else None
    if json_out:
        d = asdict(tr)
        d["peak_bytes"] = tr.peak_bytes
        d["peak_phase"] = tr.peak.phase
        d["estimate"] = est.to_dict() if est is not None else None
        d["comparison"] = asdict(cmp) if cmp is not None else None
        typer.echo(json.dumps(d, indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    from peftplan.trace.check import COMPONENTS

    console = Console()
    t = Table(title=f"trace: {card.name} · {plan.method} · b={plan.batch_size} s={plan.seq_len} "
                    f"({tr.ops:,} ops, {tr.seconds:.2f} s)", title_justify="left")
    t.add_column("category")
    by_phase = {m.phase: m for m in est.phases} if est is not None else {}

    def est_gib(phase: str, field: str) -> str:
        return _gib(getattr(by_phase[phase], field)) if phase in by_phase else "-"

    for p in tr.phases:
        t.add_column(f"{p.phase}{' ★' if p is tr.peak else ''}", justify="right")
        t.add_column("estimate", justify="right", style="dim")
    for field, cat in COMPONENTS.items():
        row = [cat.replace("_", " ")]
        for p in tr.phases:
            row += [_gib(p.by_category_bytes.get(cat, 0)), est_gib(p.phase, field)]
        t.add_row(*row)
    t.add_section()
    row = ["peak (live tensors)"]
    for p in tr.phases:
        row += [_gib(p.peak_bytes), _gib(by_phase[p.phase].tensor_bytes) if p.phase in by_phase else "-"]
    t.add_row(*row, style="bold")
    console.print(t)
    for p in tr.phases:
        console.print(f"{p.phase}: peak at op #{p.op_index} {p.op} in {p.module or '-'}")
    if cmp is None:
        console.print("estimate: DoRA is not modelled yet (trace only)")
        return
    console.print(f"estimate vs trace: {100 * cmp.peak_error:+.2f}% at the peak "
                  f"({cmp.estimate_phase} vs {cmp.trace_phase})")


def check_cmd(
    model: list[str] = typer.Option(["opt-125m", "llama-3.2-1b"], "--model", "-m", help="cards to check"),
    methods: str = typer.Option("full,adapter,lora,qlora", help="comma list"),
    batches: str = typer.Option("1,2", help="comma list of batch sizes"),
    seqs: str = typer.Option("128,256", help="comma list of sequence lengths"),
    ranks: str = typer.Option("8", help="comma list of LoRA ranks"),
    attentions: str = typer.Option("sdpa", help="comma list: sdpa,eager"),
    checkpointing: str = typer.Option("off,on", help="comma list: off,on"),
    optimizers: str = typer.Option("adamw", help="comma list"),
    tolerance: float = typer.Option(0.02, help="relative error bound for the summary"),
    json_out: Json = False,
) -> None:
    """Estimate vs trace over a grid: per-configuration errors and median / p90 / max."""
    from peftplan.planning.cards import load_card
    from peftplan.planning import estimate
    from peftplan.trace.check import compare, grid, summarize
    from peftplan.trace.run import trace

    def split(s: str) -> list[str]:
        return [x.strip() for x in s.split(",") if x.strip()]

    try:
        cards = [load_card(m) for m in model]
        configs = grid(cards, methods=tuple(split(methods)), ranks=tuple(int(x) for x in split(ranks)),
                       batches=tuple(int(x) for x in split(batches)), seqs=tuple(int(x) for x in split(seqs)),
                       checkpointing=tuple(x == "on" for x in split(checkpointing)),
                       attentions=tuple(split(attentions)), optimizers=tuple(split(optimizers)))
    except (PlanError, ValueError) as e:
        fail(str(e))
    results, failures = [], []
    from rich.console import Console

    console = Console(stderr=json_out)
    for card, plan in configs:
        label = (f"{card.name} {plan.method} r={plan.r} b={plan.batch_size} s={plan.seq_len} "
                 f"gc={'on' if plan.grad_checkpointing else 'off'} {plan.attention} {plan.optimizer}")
        try:
            c = compare(estimate(card, plan), trace(card, plan))
        except PlanError as e:  # one failure never loses the others
            failures.append(f"{label}: {e}")
            console.print(f"[red]FAIL[/red] {label}: {e}")
            continue
        results.append(c)
        mark = "ok " if abs(c.peak_error) <= tolerance else "OUT"
        console.print(f"{mark} {label}: {100 * c.peak_error:+6.2f}%  ({c.trace_phase})")
    s = summarize(results, failures)
    if json_out:
        typer.echo(json.dumps({"summary": asdict(s), "results": [asdict(c) for c in results]}, indent=2, default=str))
    else:
        console.print(f"{s.n} configurations: median |error| {100 * s.median_abs_error:.2f}%, "
                      f"p90 {100 * s.p90_abs_error:.2f}%, max {100 * s.max_abs_error:.2f}%; "
                      f"{s.within_2pct} within 2%; {len(s.failures)} failed")
    if failures:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("trace")(trace_cmd)
    app.command("check")(check_cmd)
