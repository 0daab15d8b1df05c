"""`peftplan trace` and `peftplan check`: the fake-tensor ground truth, and the estimate held to it."""
from __future__ import annotations

import json
from dataclasses import asdict
from typing import Optional

import typer

from peftplan.cli import (AdapterDtype, AdapterSize, Alpha, Attention, Autocast, Batch, Dora, DoubleQuant, Dropout,
                          Dtype, Foreach, From, Gpus, GradAccum, GradCkpt, Json, KbitPrep, MaxGradNorm, Method, Model,
                          MoeRouting, Nodes, Optim, Placement, R, Reentrant, Seq, ShiftCopy, Strategy, Targets, TopK,
                          fail, make_plan, Yes, with_files)
from peftplan.errors import PlanError, quote


def _gib(n: float) -> str:
    return f"{n / 2**30:,.3f} GiB"


def trace_cmd(
    model: Model = "opt-125m", method: Method = "lora", r: R = 16, alpha: Alpha = 16.0, dropout: Dropout = 0.0,
    targets: Targets = None, adapter_size: AdapterSize = 64, adapter_placement: Placement = "houlsby",
    top_k: TopK = 2, batch_size: Batch = 1, seq_len: Seq = 512, dtype: Dtype = "bf16", optimizer: Optim = "adamw",
    foreach: Foreach = True, grad_checkpointing: GradCkpt = False, attention: Attention = "sdpa",
    double_quant: DoubleQuant = True, kbit_prep: KbitPrep = True, adapter_dtype: AdapterDtype = "fp32",
    dora: Dora = False, autocast: Autocast = "none", grad_accum: GradAccum = 1, max_grad_norm: MaxGradNorm = 1.0,
    use_reentrant: Reentrant = False, logits_shift_copy: ShiftCopy = False, moe_routing: MoeRouting = "balanced",
    impl: str = typer.Option("auto", help="LoRA layers: peft (get_peft_model) | ours | auto (peft when installed)"),
    steps: int = typer.Option(2, help="steps to run; the last (steady-state) one is reported"),
    n_layers: Optional[int] = typer.Option(None, "--n-layers", help="keep only the card's first N blocks"),
    reserved: bool = typer.Option(False, "--reserved", help="replay the allocations through the caching allocator"),
    seq_lens: str = typer.Option(None, help="one sequence length per step, e.g. 512,2048,1024 (implies --reserved)"),
    seq_percentiles: str = typer.Option(None, help="lengths drawn per step from percentiles, e.g. 50:512,90:2048"),
    alloc_conf: str = typer.Option("", help="PYTORCH_CUDA_ALLOC_CONF for the replay, e.g. expandable_segments:True"),
    json_out: Json = False, yes: Yes = False, from_files: From = None, gpus: Gpus = 1, nodes: Nodes = 1,
    strategy: Strategy = "none",
) -> None:
    """Run the real training step on fake tensors (CPU, no memory) and report the exact live-tensor peak.

    With --gpus N --strategy fsdp|fsdp-grad-op|fsdp-hybrid: PyTorch's FSDP2 step on a fake process group of N
    ranks, one process; rank 0's live bytes."""
    from peftplan.planning.cards import load_card
    from peftplan.planning import estimate
    from peftplan.planning.validate import MAX_TRACE_OPS, check_work, predicted_trace_ops
    from peftplan.trace.check import compare

    try:
        plan = make_plan(method, r, alpha, dropout, targets, adapter_size, adapter_placement, top_k, batch_size,
                         seq_len, dtype, optimizer, foreach, grad_checkpointing, attention, double_quant, kbit_prep,
                         adapter_dtype=adapter_dtype, use_dora=dora, autocast=autocast, grad_accum=grad_accum,
                         max_grad_norm=max_grad_norm, use_reentrant=use_reentrant, moe_routing=moe_routing,
                         logits_shift_copy=logits_shift_copy)
        plan = plan.with_(gpus=gpus, nodes=nodes, strategy=strategy)
        if gpus > 1 and strategy not in ("fsdp", "fsdp-grad-op", "fsdp-hybrid"):
            raise PlanError(f"the distributed trace runs FSDP2: give --strategy fsdp|fsdp-grad-op|fsdp-hybrid "
                            f"with --gpus {gpus} (got {strategy})")
        model, plan = with_files(from_files, plan, model)
        if steps < 1:
            raise PlanError(f"steps must be at least 1, got {steps}")
        card = load_card(model)
        blocks = ""
        if n_layers is not None:
            from peftplan.trace.random_check import cut

            blocks = f" (first {min(n_layers, card.n_layers)} of {card.n_layers} blocks)"
            card = cut(card, n_layers)
        est = estimate(card, plan)
        check_work(f"the predicted trace ({card.n_layers} blocks × {steps} steps, in ops)",
                   predicted_trace_ops(card.n_layers, steps), MAX_TRACE_OPS, yes)
        from peftplan.planning.allocator import AllocatorConfig
        from peftplan.trace.reserved import parse_seq_lens
        from peftplan.trace.run import trace

        lens = parse_seq_lens(seq_lens, seq_percentiles, steps)
        if lens:  # the trace reports, and the estimate describes, the last step
            plan = plan.with_(seq_len=lens[-1])
            est = estimate(card, plan)
        conf = AllocatorConfig.parse(alloc_conf)
        reserved = reserved or lens is not None or bool(alloc_conf)
        tr = trace(card, plan, steps=steps, impl=impl, seq_lens=lens, record_events=reserved)
        rp = None
        if reserved:
            from peftplan.planning.replay import replay

            rp = replay(tr.events, conf, seq_lens=lens or ())
    except PlanError as e:
        fail(str(e))
    except ImportError as e:
        fail(f"tracing needs torch, transformers and peft ({e.name} is missing): pip install -e '.[torch,quant]'")
    cmp = compare(est, tr) if est is not None else None
    if json_out:
        d = asdict(tr)
        del d["events"]
        if rp is not None:
            d["replay"] = asdict(rp)
            d["replay"]["reserved_per_step"] = rp.reserved_per_step
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
    from peftplan.render import safe

    t = Table(title=f"trace: {safe(card.name)}{blocks} · {plan.method} · b={plan.batch_size} s={plan.seq_len} "
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
        console.print(f"{p.phase}: peak at op #{p.op_index} {safe(p.op)} in {safe(p.module or '-')}")
    if cmp is None:
        console.print("estimate: DoRA is not modelled yet (trace only)")
        return
    console.print(f"estimate vs trace: {100 * cmp.peak_error:+.2f}% at the peak "
                  f"({cmp.estimate_phase} vs {cmp.trace_phase})")
    if rp is not None:
        from peftplan.trace.reserved import render

        render(console, rp)


def parse_list(text: str, option: str, kind: type = str, choices: tuple[str, ...] = ()) -> tuple:
    """A comma list option: non-empty, each item of the kind (and among the choices); one-line errors."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise PlanError(f"{option} needs at least one value, got {quote(text)}")
    out = []
    for x in items:
        if choices and x not in choices:
            raise PlanError(f"{option}: unknown value {quote(x)} (choose from {', '.join(choices)})")
        if kind is int:
            try:
                out.append(int(x))
            except ValueError:
                raise PlanError(f"{option}: {quote(x)} is not a whole number") from None
        else:
            out.append(x)
    return tuple(out)


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
    random_n: Optional[int] = typer.Option(None, "--random", help="instead of the grid: N configurations drawn "
                                           "at random over every card family and Plan option (small cuts of "
                                           "the cards)"),
    seed: Optional[int] = typer.Option(None, help="--random: the seed of the draw (the same seed draws the same "
                                       "list; default 0)"),
    n_layers: Optional[int] = typer.Option(None, "--n-layers", help="keep only each card's first N blocks"),
    json_out: Json = False, yes: Yes = False,
) -> None:
    """Estimate vs trace over a grid (or a random draw): per-configuration errors and median / p90 / max.

    A configuration that cannot be estimated or traced is a FAIL row with its reason and the others go on;
    then one line on stderr says how many failed, and the exit code is 2.
    """
    if random_n is not None:
        from peftplan.planning.validate import MAX_CHECK_CONFIGS, check_work

        if random_n < 1:
            fail(f"--random must be at least 1, got {random_n}")
        check_work("the random draw (configurations)", random_n, MAX_CHECK_CONFIGS, yes)
        return _check_random(random_n, seed or 0, tolerance, json_out)
    if seed is not None:
        fail("--seed applies only to a random draw: add --random N")
    from peftplan.planning.cards import load_card
    from peftplan.planning import estimate
    from peftplan.planning.validate import (MAX_CHECK_CONFIGS, MAX_TRACE_OPS, check_float, check_work,
                                            predicted_trace_ops)
    from peftplan.render import safe
    from peftplan.trace.check import compare, grid, one_line, summarize
    from peftplan.trace.run import trace

    try:
        check_float(tolerance, "tolerance", 0.0, 1.0, lo_open=True)
        cards = [load_card(m) for m in model]
        if n_layers is not None:
            from peftplan.trace.random_check import cut

            cards = [cut(card, n_layers) for card in cards]
        configs = grid(cards, methods=parse_list(methods, "--methods"),
                       ranks=parse_list(ranks, "--ranks", int), batches=parse_list(batches, "--batches", int),
                       seqs=parse_list(seqs, "--seqs", int),
                       checkpointing=tuple(x == "on" for x in parse_list(checkpointing, "--checkpointing",
                                                                           choices=("off", "on"))),
                       attentions=parse_list(attentions, "--attentions"),
                       optimizers=parse_list(optimizers, "--optimizers"))
        check_work("the number of configurations", len(configs), MAX_CHECK_CONFIGS, yes)
        for card in cards:
            check_work(f"the predicted trace of {card.name} (ops)", predicted_trace_ops(card.n_layers, 2),
                       MAX_TRACE_OPS, yes)
    except PlanError as e:
        fail(str(e))
    results, failures, rows = [], [], []
    from rich.console import Console

    console = Console(stderr=json_out)
    interrupted = False
    for card, plan in configs:
        label = (f"{card.name} {plan.method} r={plan.r} b={plan.batch_size} s={plan.seq_len} "
                 f"gc={'on' if plan.grad_checkpointing else 'off'} {plan.attention} {plan.optimizer}")
        try:
            c = compare(estimate(card, plan), trace(card, plan))
        except PlanError as e:  # one failure never loses the others
            failures.append(f"{label}: {one_line(e)}")
            rows.append({"config": label, "error": one_line(e)})
            console.print(f"[red]FAIL[/red] {safe(label)}: {safe(one_line(e))}", soft_wrap=True)
            continue
        except KeyboardInterrupt:  # keep what finished
            interrupted = True
            break
        results.append(c)
        rows.append({"config": label, "error": None})
        mark = "ok " if abs(c.peak_error) <= tolerance else "OUT"
        console.print(f"{mark} {safe(label)}: {100 * c.peak_error:+6.2f}%  ({c.trace_phase})", soft_wrap=True)
    s = summarize(results, failures)
    if json_out:
        typer.echo(json.dumps({"summary": asdict(s), "results": [asdict(c) for c in results], "rows": rows},
                              indent=2, default=str))
    elif s.n:
        console.print(f"{s.n} configurations: median |error| {100 * s.median_abs_error:.2f}%, "
                      f"p90 {100 * s.p90_abs_error:.2f}%, max {100 * s.max_abs_error:.2f}%; "
                      f"{s.within_2pct} within 2%; {len(s.failures)} failed")
    if interrupted:
        raise typer.Exit(130)
    if failures:
        fail(f"{len(failures)} of {len(rows)} configurations failed; first: {failures[0]}")


def _check_random(n: int, seed: int, tolerance: float, json_out: bool) -> None:
    """`check --random N --seed S`: errors worst first, each with the command that reproduces it."""
    from rich.console import Console

    from peftplan.render import safe
    from peftplan.trace.check import one_line, summarize
    from peftplan.trace.random_check import check, command, draws

    if n < 0:
        fail(f"--random must be positive, got {n}")
    console = Console(stderr=json_out)
    console.print(f"random draw: {n} configurations, seed {seed}")

    def progress(i, card, plan, c, reason) -> None:
        if c is None:
            console.print(f"[red]FAIL[/red] [{i + 1}/{n}] {safe(one_line(reason))}", markup=True, highlight=False)
        else:
            console.print(f"{'ok ' if abs(c.peak_error) <= tolerance else 'OUT'} [{i + 1}/{n}] "
                          f"{100 * c.peak_error:+6.2f}% ({c.trace_phase})", highlight=False)

    results, failures = check(draws(n, seed), progress)
    worst = sorted(results, key=lambda rc: -abs(rc[1].peak_error))
    s = summarize([c for _, c in results], failures)
    if json_out:
        rows = [{"command": command(card, c.plan), "comparison": asdict(c)} for card, c in worst]
        typer.echo(json.dumps({"seed": seed, "summary": asdict(s), "results": rows}, indent=2, default=str))
    else:
        for card, c in worst:
            console.print(f"{100 * c.peak_error:+6.2f}% {c.trace_phase:9s} {command(card, c.plan)}",
                          highlight=False, soft_wrap=True)
        console.print(f"{s.n} configurations (seed {seed}): median |error| {100 * s.median_abs_error:.2f}%, "
                      f"p90 {100 * s.p90_abs_error:.2f}%, max {100 * s.max_abs_error:.2f}%; "
                      f"{s.within_2pct} within 2%; {len(s.failures)} failed")
    if failures:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("trace")(trace_cmd)
    app.command("check")(check_cmd)
