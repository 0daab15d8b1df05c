"""`peftplan report` (the HTML capacity report) and `peftplan fit` (the fit matrix in the terminal).

Both turn a PlanError into one line on stderr and exit code 2. The report is computed and rendered by
`peftplan.report`; this module only parses options and writes the file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from peftplan.cli import (AdapterDtype, AdapterSize, Attention, Autocast, Dora, Dtype, From, GradAccum, GradCkpt,
                          Json, MaxGradNorm, Optim, R, Reentrant, Seq, ShiftCopy, Targets, TopK, fail, with_files)
from peftplan.errors import PlanError, quote
from peftplan.planning.validate import check_tokens
from peftplan.plan import Plan

DEFAULT_GPUS = "t4,rtx4090,a100-40gb,h100-sxm"
Models = Annotated[Optional[list[str]], typer.Option(
    "--model", "-m", help="card name, config.json or folder; repeat for several models")]
Gpus = Annotated[str, typer.Option(help="comma-separated GPU cards (see `peftplan gpus`)")]
Methods = Annotated[str, typer.Option(help="comma-separated methods: full, top, adapter, lora, qlora")]
Batch = Annotated[int, typer.Option("--batch-size", "-b", help="micro-batch b of the breakdown, curves and cost")]
Tokens = Annotated[float, typer.Option(help="token budget for GPU-hours and cost (0: cost per million tokens)")]
Output = Annotated[Path, typer.Option("--output", "-o", help="HTML file to write")]
MeasuredDir = Annotated[Optional[Path], typer.Option(help="measured results to compare with (profiles/measured/)")]


def split(csv: str, option: str = "") -> list[str]:
    """A comma list option; with `option` named, an empty list is refused."""
    items = [x.strip() for x in csv.split(",") if x.strip()]
    if option and not items:
        raise PlanError(f"{option} needs at least one value, got {quote(csv)}")
    return items


def need_dir(path: Path | None) -> Path | None:
    """A `--measured-dir` the user named must be a folder that exists."""
    from peftplan.planning.cards import _exists

    if path is not None and not _exists(path)[0]:
        raise PlanError(f"--measured-dir {quote(str(path))} is not a folder")
    return path


def need_models(models: list[str] | None) -> list[str]:
    if not models:
        raise PlanError("give at least one --model")
    return models


def models_with_files(files: list[str] | None, base: Plan, models: list[str] | None) -> tuple[list[str] | None, Plan]:
    """The base plan with `--from` files applied; the files' model joins the list when no --model is given."""
    one, base = with_files(files, base, models[0] if models else None)
    return (models or ([one] if one else None)), base


def base_plan(r: int, targets: str | None, adapter_size: int, top_k: int, dtype: str, optimizer: str,
              attention: str, **stack) -> Plan:
    """`stack`: the peft/Trainer options by Plan field name (report: adapter_dtype, use_dora, autocast, ...)."""
    return Plan(r=r, targets=targets, adapter_size=adapter_size, top_k=top_k, dtype=dtype, optimizer=optimizer,
                attention=attention, **stack)


def report(
    model: Models = None, gpus: Gpus = DEFAULT_GPUS, methods: Methods = "full,adapter,lora,qlora",
    seq_len: Seq = 512, batch_size: Batch = 1, tokens: Tokens = 1e8, output: Output = Path("reports/report.html"),
    r: R = 16, targets: Targets = None, adapter_size: AdapterSize = 64, top_k: TopK = 2, dtype: Dtype = "bf16",
    optimizer: Optim = "adamw", attention: Attention = "sdpa", measured_dir: MeasuredDir = None,
    from_files: From = None, adapter_dtype: AdapterDtype = "fp32", dora: Dora = False, autocast: Autocast = "none",
    grad_accum: GradAccum = 1, max_grad_norm: MaxGradNorm = 1.0, use_reentrant: Reentrant = False,
    logits_shift_copy: ShiftCopy = False, grad_checkpointing: GradCkpt = False,
) -> None:
    """One self-contained HTML page: what fits where, why, and what it costs."""
    from peftplan.report import build_report
    from peftplan.report.measured import MEASURED_DIR

    try:
        stack = dict(adapter_dtype=adapter_dtype, use_dora=dora, autocast=autocast, grad_accum=grad_accum,
                     max_grad_norm=max_grad_norm, use_reentrant=use_reentrant, logits_shift_copy=logits_shift_copy)
        model, base = models_with_files(from_files, base_plan(r, targets, adapter_size, top_k, dtype, optimizer,
                                                              attention, grad_checkpointing=grad_checkpointing,
                                                              **stack), model)
        page = build_report(
            need_models(model), split(gpus, "--gpus"), methods=split(methods, "--methods"), seq_len=seq_len,
            batch_size=batch_size, tokens=check_tokens(tokens), base=base,
            measured_dir=need_dir(measured_dir) or MEASURED_DIR,
        )
    except PlanError as e:
        fail(str(e))
    write_output(output, page)
    typer.echo(f"{output} ({len(page.encode()) / 2**20:.1f} MiB)")


def write_output(output: Path, page: str) -> None:
    """A regular file (new or replaced) is written atomically; a device or pipe (/dev/stdout) directly."""
    from peftplan.profile.store import write_atomic

    where = quote(str(output), 200)
    try:
        for parent in (output.parent, *output.parent.parents):
            if parent.exists():
                if not parent.is_dir():
                    fail(f"cannot write {where}: {quote(str(parent), 200)} is a file, not a folder")
                break
        if output.is_dir():
            fail(f"cannot write {where}: it is a folder")
        if output.exists() and not output.is_file():
            output.write_text(page, encoding="utf-8")
        else:
            write_atomic(output, page)
    except OSError as e:
        fail(f"cannot write {where}: {e.strerror or e}")


def fit(
    model: Models = None, gpus: Gpus = DEFAULT_GPUS, methods: Methods = "full,adapter,lora,qlora",
    seq_len: Seq = 512, r: R = 16, targets: Targets = None, adapter_size: AdapterSize = 64, top_k: TopK = 2,
    dtype: Dtype = "bf16", optimizer: Optim = "adamw", attention: Attention = "sdpa", json_out: Json = False,
    from_files: From = None,
    cluster: Annotated[bool, typer.Option("--cluster", help="fewest GPUs per card × strategy, cheapest first")] = False,
    strategies: Annotated[str, typer.Option(help="with --cluster: strategies to compare")] = "ddp,zero2,zero3,fsdp",
    gpus_per_node: Annotated[int, typer.Option(help="with --cluster: GPUs in one node")] = 8,
    batch_size: Batch = 1, grad_checkpointing: GradCkpt = False,
    tokens: Annotated[float, typer.Option(help="with --cluster: token budget for GPU-hours and cost")] = 0,
    adapter_dtype: AdapterDtype = "fp32", dora: Dora = False, autocast: Autocast = "none", grad_accum: GradAccum = 1,
    max_grad_norm: MaxGradNorm = 1.0, use_reentrant: Reentrant = False, logits_shift_copy: ShiftCopy = False,
) -> None:
    """Largest batch at --seq-len and longest sequence at batch 1, for every model × GPU × method.

    With --cluster: for each model and method, the fewest GPUs of each card under each strategy, cheapest first."""
    from peftplan.planning.fit import fit_matrix

    stack = dict(adapter_dtype=adapter_dtype, use_dora=dora, autocast=autocast, grad_accum=grad_accum,
                 max_grad_norm=max_grad_norm, use_reentrant=use_reentrant, logits_shift_copy=logits_shift_copy)
    if cluster:
        return fit_cluster(model, gpus, methods, seq_len, batch_size, grad_checkpointing, strategies, gpus_per_node,
                           tokens, base_plan(r, targets, adapter_size, top_k, dtype, optimizer, attention, **stack),
                           json_out)
    try:
        model, base = models_with_files(from_files, base_plan(r, targets, adapter_size, top_k, dtype, optimizer,
                                                              attention, grad_checkpointing=grad_checkpointing,
                                                              **stack), model)
        fm = fit_matrix(need_models(model), split(gpus, "--gpus"), split(methods, "--methods"), seq_len, base=base)
    except PlanError as e:
        fail(str(e))
    if json_out:
        typer.echo(json.dumps(fm.to_dict(), indent=2))
        return
    render_fit(fm)


def fit_cluster(models, gpus: str, methods: str, seq_len: int, batch_size: int, ckpt: bool, strategies: str,
                gpus_per_node: int, tokens: float, base: Plan, json_out: bool) -> None:
    from peftplan.planning.cluster import cheapest_cluster

    try:
        if not (tokens == tokens and 0 <= tokens < 1e18):
            raise PlanError(f"token budget must be a non-negative number, got {tokens:g}")
        plans = [cheapest_cluster(m, base.with_(method=meth, seq_len=seq_len, batch_size=batch_size,
                                                 grad_checkpointing=ckpt), split(gpus), split(strategies),
                                  int(tokens), gpus_per_node)
                 for m in need_models(models) for meth in split(methods)]
    except PlanError as e:
        fail(str(e))
    if json_out:
        typer.echo(json.dumps([p.to_dict() for p in plans], indent=2))
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    for cp in plans:
        t = Table(title=f"{escape(cp.model)} · {cp.method}: fewest GPUs per card and strategy, cheapest first",
                  title_justify="left")
        for col in ("GPU", "strategy", "GPUs", "nodes", "peak/GPU", "tokens/s", "$/hour", "$/M tokens") + \
                (("$",) if cp.tokens else ()):
            t.add_column(col, justify="left" if col in ("GPU", "strategy") else "right", no_wrap=True)
        for o in cp.options:
            if not o.fits:
                t.add_row(escape(o.gpu), o.strategy, "[red]✗[/red]", "", "", "", "", "", *(("",) if cp.tokens else ()))
                continue
            row = [escape(o.gpu), o.strategy, str(o.gpus), str(o.nodes), f"{o.peak_bytes / 2**30:.1f} GiB",
                   f"{o.tokens_per_s:,.0f}", f"{o.usd_per_hour:,.2f}",
                   f"{o.usd_per_hour / o.tokens_per_s / 3600 * 1e6:,.2f}" if o.tokens_per_s else ""]
            t.add_row(*row, *((f"{o.cost_usd:,.0f}",) if cp.tokens else ()))
        console.print(t)
    console.print("✗: does not fit up to 512 GPUs · communication time is not modelled", style="dim")


def cell_text(c) -> str:
    """'6 / 2,048*': largest batch / longest sequence ('✗': none fits, '*': every position fits)."""
    batch = "✗" if not c.fits else f"{'≥' if c.batch_capped else ''}{c.largest_batch:,}"
    seq = "✗" if c.longest_seq == 0 else f"{c.longest_seq:,}{'*' if c.seq_capped else ''}"
    return f"{batch} / {seq}"


def render_fit(fm, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    from peftplan.render import safe as escape

    console = console or Console()
    for method in fm.methods:
        t = Table(title=f"{method}: largest b at s = {fm.seq_len} / longest s at b = 1", title_justify="left")
        t.add_column("model", overflow="fold")
        for g in fm.gpus:
            t.add_column(escape(g), justify="right", no_wrap=True)
        for m in fm.models:
            name = escape(m) + (" [red](fits nowhere)[/red]" if fm.fits_nowhere(m, method) else "")
            t.add_row(name, *(cell_text(c) if c.fits else f"[red]{cell_text(c)}[/red]" for c in fm.row(m, method)))
        console.print(t)
        for m in fm.models:
            ranked = fm.by_cost(m, method)
            if ranked:
                console.print(f"  {escape(m)} by cost at the largest batch: " + " < ".join(
                    f"{escape(c.gpu)} ${c.usd_per_million_tokens:,.2f}/Mtok ({c.tokens_per_s:,.0f} tok/s)"
                    for c in ranked))
    console.print("✗: not even 1 fits · *: every position of the model fits · $: roofline time × the card's "
                  "indicative price", style="dim")
    if fm.base is not None:
        p = fm.base
        kbit = "" if p.grad_checkpointing else " (peft's k-bit preparation turns it on for QLoRA: --grad-checkpointing)"
        console.print(f"every cell: {p.dtype} weights, autocast {p.autocast}, {p.optimizer}, {p.attention} attention, "
                      f"gradient checkpointing {'on' if p.grad_checkpointing else 'off'}{kbit}, grad-accum "
                      f"{p.grad_accum}", style="dim")


def register(app: typer.Typer) -> None:
    app.command("report")(report)
    app.command("fit")(fit)
