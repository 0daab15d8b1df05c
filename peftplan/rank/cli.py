"""`peftplan rank ADAPTER_A ADAPTER_B`: the rank advisor. Parses options, calls `analyse_ranks`, renders.

Bad input (a PlanError) is one line on stderr and exit code 2. numpy and safetensors load only when the
command runs, so importing this module on every CLI start costs nothing.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from peftplan.cli import Batch, Json, Seq, fail
from peftplan.errors import PlanError

Adapter = Annotated[Path, typer.Argument(help="peft adapter folder (adapter_config.json + adapter_model.safetensors) "
                                              "or a safetensors file of LoRA weights")]
Threshold = Annotated[float, typer.Option(help="φ(i, i) above this counts as a shared direction")]
BaseModel = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="base model for the memory saved (card or config.json); default: found from the adapters")]
Method = Annotated[str, typer.Option(help="lora | qlora: the training the memory is estimated for")]
Html = Annotated[Optional[Path], typer.Option(help="write the φ heatmaps to this HTML file")]


def rank(adapter_a: Adapter, adapter_b: Adapter, threshold: Threshold = 0.5, model: BaseModel = None,
         method: Method = "lora", batch_size: Batch = 1, seq_len: Seq = 512, html: Html = None,
         json_out: Json = False) -> None:
    """Which LoRA rank suffices: φ subspace similarity of two adapters (LoRA paper §7.2) and the memory saved."""
    from peftplan.plan import Plan

    try:
        from peftplan.rank.analyse import analyse_ranks
    except ImportError as e:
        fail(f"peftplan rank needs numpy, safetensors and threadpoolctl ({e.name} is missing): "
             "pip install -e '.[rank]'")
    try:
        plan = Plan(method=method, batch_size=batch_size, seq_len=seq_len)
        result = analyse_ranks(adapter_a, adapter_b, threshold=threshold, model=model, plan=plan)
    except PlanError as e:
        fail(str(e))
    if html is not None:
        from peftplan.profile.store import write_atomic
        from peftplan.rank.html import render_rank_html

        try:
            write_atomic(html, render_rank_html(result))
        except OSError as e:
            fail(f"cannot write '{html}': {e.strerror or e}")
    for n in result.notes:
        typer.echo(f"peftplan: note: {n}", err=True)
    if json_out:
        typer.echo(json.dumps(result.to_dict(), indent=1, allow_nan=False))
    else:
        render_rank(result)
    if html is not None:
        typer.echo(f"{html}", err=json_out)


def render_rank(a, console=None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    t = Table(title=f"φ(A_r={a.r1}, A_r={a.r2}) by module kind (threshold {a.threshold:g}, LoRA paper §7.2)",
              title_justify="left")
    for col in ("module", "layers", "d_in", "φ(1,1)", "random", "captured", "r"):
        t.add_column(col, justify="left" if col == "module" else "right", no_wrap=True)
    for k in a.kinds:
        lo, hi = min(k.captured_ranks), max(k.captured_ranks)
        spread = f"{lo}–{hi}" if lo != hi else ""
        t.add_row(escape(k.name), str(len(k.layers)), f"{k.d_in:,}", f"{k.median_diagonal[0]:.3f}",
                  f"{k.random_diagonal[0]:.4f}", f"{k.captured_rank}" + (f" ({spread})" if spread else ""),
                  str(k.recommended_r))
    console.print(t)
    console.print("φ(1,1): median over layers; random: the baseline i/d_in; captured: the largest i with "
                  "φ(i', i') above the threshold for all i' ≤ i in more than half of the layers (range over layers)",
                  style="dim")
    console.print(f"recommended r = [bold]{a.recommended_r}[/bold] (r1 = {a.r1}, r2 = {a.r2})")
    m = a.memory
    if m is not None:
        console.print(f"{escape(m.model)} · {m.plan.method} · b = {m.plan.batch_size}, s = {m.plan.seq_len}: "
                      f"peak {m.peak_bytes[1] / 2**30:,.3f} GiB at r = {a.r2} → {m.peak_bytes[2] / 2**30:,.3f} GiB "
                      f"at r = {a.recommended_r}: saves {m.saved_bytes / 2**20:,.1f} MiB and "
                      f"{m.saved_params:,} trainable parameters")


def register(app: typer.Typer) -> None:
    app.command("rank")(rank)
