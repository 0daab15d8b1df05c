"""`peftplan profile`: the command, its progress bar and its tables. `register(app)` adds it to an app.

Options that name a model or a Plan field take comma-separated lists (`--method lora,qlora -b 1,4`); the
points are their cartesian product, or those of `--grid FILE`. Without a GPU the command says in one line
what is missing and exits with code 2.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from peftplan.cli import (AdapterDtype, Attention, Autocast, Dora, GradAccum, MaxGradNorm, Reentrant,
                          ShiftCopy)
from peftplan.errors import PlanError
from peftplan.profile.nvml import DEFAULT_INTERVAL_S, GpuUnavailable
from peftplan.profile.store import MEASURED_DIR, Measurement, Settings

GiB = 2**30


def _fmt_bytes(n: float) -> str:
    return f"{n / GiB:,.3f} GiB" if abs(n) >= 2**24 else f"{n / 2**20:,.2f} MiB"


def _fmt_err(e: float | None) -> str:
    return "—" if e is None else f"{100 * e:+.1f}%"


# ---------------------------------------------------------------- points from options


def points_from_options(model: str, method: str, r: str, alpha: float, dropout: float, targets: str | None,
                        adapter_size: str, adapter_placement: str, top_k: str, batch_size: str, seq_len: str,
                        dtype: str, optimizer: str, foreach: bool, grad_checkpointing: bool, attention: str,
                        double_quant: bool, kbit_prep: bool, settings: dict, max_points: int | None = None,
                        **stack) -> list:
    """`stack`: the peft/Trainer options by Plan field name (adapter_dtype, use_dora, autocast, grad_accum,
    max_grad_norm, use_reentrant, logits_shift_copy), one value each."""
    from peftplan.profile.grid import dedupe, expand, split_list

    spec = {
        "model": split_list(model), "method": split_list(method), "r": split_list(r, int), "alpha": alpha,
        "dropout": dropout, "targets": targets, "adapter_size": split_list(adapter_size, int),
        "adapter_placement": adapter_placement, "top_k": split_list(top_k, int),
        "batch_size": split_list(batch_size, int), "seq_len": split_list(seq_len, int),
        "dtype": split_list(dtype), "optimizer": split_list(optimizer), "foreach": foreach,
        "grad_checkpointing": grad_checkpointing, "attention": split_list(attention),
        "double_quant": double_quant, "kbit_prep": kbit_prep, **stack,
    }
    return dedupe(expand(spec, settings, max_points))


# ---------------------------------------------------------------- rendering


class ProgressBar:
    """A rich progress bar on stderr, fed by `run_grid`."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=Console(stderr=True))
        self.task = None

    def __enter__(self) -> "ProgressBar":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def started(self, total: int) -> None:
        self.task = self.progress.add_task("profile", total=total)

    def point_started(self, index: int, point) -> None:
        self.progress.update(self.task, description=point.label)

    def point_done(self, index: int, point, result, error: str) -> None:
        status = result.status if result is not None else "error"
        if status != "ok":
            from peftplan.render import safe

            self.progress.console.print(f"[yellow]{safe(point.label)}: {status}[/] {safe(error)}".rstrip())
        self.progress.advance(self.task)


def render_measurement(console, m: Measurement) -> None:
    from rich.table import Table

    from peftplan.render import safe

    title = f"{safe(m.model)}  {m.plan.method}  b={m.plan.batch_size} s={m.plan.seq_len}"
    if m.plan.grad_checkpointing:
        title += "  ckpt"
    title += f"  on {safe(m.environment.gpu_name)}"
    if m.environment.simulated:
        title += " [simulated]"
    if m.status != "ok":
        f = m.failure
        where = f.stage + (f" (step {f.step})" if f.step >= 0 else "")
        what = "does not fit" if m.status == "does-not-fit" else "failed"
        console.print(f"[bold]{title}[/]: {what} in {where}: allocated {_fmt_bytes(f.allocated_bytes)}, "
                      f"peak allocated {_fmt_bytes(f.peak_allocated_bytes)}, reserved "
                      f"{_fmt_bytes(f.peak_reserved_bytes)}; {safe(f.message)}")
        return
    table = Table(title=title, title_justify="left")
    for col in ("figure", "measured", "predicted", "error", "error %"):
        table.add_column(col, justify="left" if col == "figure" else "right")
    for r in m.comparison:
        table.add_row(r.name, _fmt_bytes(r.measured_bytes), _fmt_bytes(r.predicted_bytes),
                      ("+" if r.error_bytes >= 0 else "−") + _fmt_bytes(abs(r.error_bytes)), _fmt_err(r.rel_error))
    t = m.timing
    if t is not None:
        pred = m.throughput.predicted_tokens_per_s if m.throughput else None
        table.add_row("tokens/s", f"{t.tokens_per_s:,.0f}", "—" if pred is None else f"{pred:,.0f}", "",
                      _fmt_err(m.throughput.rel_error) if m.throughput else "—")
        util = "" if t.utilisation is None else f" ({100 * t.utilisation:.1f}% of {t.peak_tflops:.0f})"
        table.add_row("step time", f"{t.step_time_s * 1e3:,.1f} ms", "", "", "")
        table.add_row("TFLOP/s", f"{t.achieved_tflops:,.1f}{util}", "", "", "")
    console.print(table)
    if m.nvml is not None and m.nvml.spikes:
        for s in m.nvml.spikes[:5]:
            step = f" step {s.step}" if s.step >= 0 else ""
            console.print(f"  NVML spike +{_fmt_bytes(s.excess_bytes)} for {s.duration_s * 1e3:.1f} ms in "
                          f"{s.phase or '?'}{step} at +{s.phase_offset_s * 1e3:.1f} ms")
    for rp in m.ranks:
        console.print(f"  rank {rp.rank}: {rp.status}, peak allocated {_fmt_bytes(rp.peak_allocated_bytes)}, "
                      f"reserved {_fmt_bytes(rp.peak_reserved_bytes)}")
    for w in m.warnings:
        console.print(f"  [yellow]warning:[/] {safe(w)}")


def render_summary(console, measurements) -> None:
    from rich.table import Table

    from peftplan.profile.compare import grid_summary
    from peftplan.render import safe

    table = Table(title="errors over the grid (predicted − measured) / measured", title_justify="left")
    for col in ("metric", "n", "median |error|", "max |error|", "bias", "worst"):
        table.add_column(col)
    for s in grid_summary(measurements):
        if s.n:
            table.add_row(s.metric, str(s.n), _fmt_err(s.median_abs_error), _fmt_err(s.max_abs_error),
                          _fmt_err(s.bias), safe(s.worst))
    console.print(table)


# ---------------------------------------------------------------- the command


def make_session(device_index: int, use_nvml: bool):
    """Check the machine, then open the profiling session (a seam the tests replace)."""
    from peftplan.profile.run import check_gpu, open_session

    check_gpu(need_nvml=use_nvml)
    return open_session(device_index=device_index, use_nvml=use_nvml)


STEP_API = None  # None: peftplan.measure.step (tests put a stand-in here)


def dry_session():
    """--dry-run: a simulated device (FakeCuda) whose memory follows each point's estimate, NVML stand-in, and
    the toy step (an embedding and a head, trained): the whole command, torchrun included, on the CPU."""
    from peftplan.planning import estimate
    from peftplan.profile.fake import FakeCuda, ToyStepApi, script_from_estimate
    from peftplan.profile.run import load_card, open_session

    fake = FakeCuda()

    class Scripted(ToyStepApi):
        def build_model(self, card, plan, device="cpu", *, seed=0):
            fake.expect(script_from_estimate(estimate(card, plan)))
            return super().build_model(card, plan, device, seed=seed)

    return open_session(fake, nvml=fake.nvml()), Scripted()


def profile(
    model: Annotated[str, typer.Option("--model", "-m", help="card name(s), comma-separated")] = "opt-125m",
    method: Annotated[str, typer.Option(help="full | top | adapter | lora | qlora (comma-separated)")] = "lora",
    r: Annotated[str, typer.Option("--r", help="LoRA rank(s)")] = "16",
    alpha: Annotated[float, typer.Option(help="LoRA α")] = 16.0,
    dropout: Annotated[float, typer.Option(help="LoRA dropout")] = 0.0,
    targets: Annotated[Optional[str], typer.Option(help="LoRA targets: names, 'all-linear' or 're:REGEX'")] = None,
    adapter_size: Annotated[str, typer.Option(help="adapter bottleneck(s) m")] = "64",
    adapter_placement: Annotated[str, typer.Option(help="houlsby | ffn")] = "houlsby",
    top_k: Annotated[str, typer.Option(help="top: blocks trained")] = "2",
    batch_size: Annotated[str, typer.Option("--batch-size", "-b", help="micro-batch size(s)")] = "1",
    seq_len: Annotated[str, typer.Option("--seq-len", "-s", help="sequence length(s)")] = "512",
    dtype: Annotated[str, typer.Option(help="bf16 | fp16 | fp32")] = "bf16",
    optimizer: Annotated[str, typer.Option(help="adamw | adamw8bit | paged-adamw | paged-adamw8bit | sgd | sgd-momentum")]
    = "adamw",
    foreach: Annotated[bool, typer.Option("--foreach/--no-foreach")] = True,
    grad_checkpointing: Annotated[bool, typer.Option("--grad-checkpointing/--no-grad-checkpointing")] = False,
    attention: Attention = "sdpa",
    double_quant: Annotated[bool, typer.Option("--double-quant/--no-double-quant")] = True,
    kbit_prep: Annotated[bool, typer.Option("--kbit-prep/--no-kbit-prep")] = True,
    adapter_dtype: AdapterDtype = "fp32", dora: Dora = False, autocast: Autocast = "none", grad_accum: GradAccum = 1,
    max_grad_norm: MaxGradNorm = 1.0, use_reentrant: Reentrant = False, logits_shift_copy: ShiftCopy = False,
    steps: Annotated[int, typer.Option(help="measured steps")] = 3,
    warmup: Annotated[int, typer.Option(help="warm-up steps before measuring")] = 1,
    interval_ms: Annotated[float, typer.Option(help="NVML sampling interval")] = DEFAULT_INTERVAL_S * 1e3,
    nvml: Annotated[bool, typer.Option("--nvml/--no-nvml", help="sample NVML device memory")] = True,
    phase_sync: Annotated[bool, typer.Option("--phase-sync/--no-phase-sync",
                                             help="synchronize at phase boundaries (per-phase seconds)")] = True,
    impl: Annotated[str, typer.Option(help="peftplan | peft (peft's LoRA, for comparison)")] = "peftplan",
    grid: Annotated[Optional[Path], typer.Option(help="grid file (TOML or JSON); replaces the plan options")]
    = None,
    out: Annotated[Path, typer.Option(help="folder for the result files")] = MEASURED_DIR,
    trace: Annotated[bool, typer.Option("--trace", help="also compare with the fake-tensor trace")] = False,
    budget_s: Annotated[Optional[float], typer.Option(help="start no new point after this many seconds")] = None,
    device: Annotated[int, typer.Option(help="CUDA device index")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="print the results as one JSON list")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="CPU: simulated CUDA and NVML, a toy step")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="run a grid past the bound of 1,000 points")] = False,
) -> None:
    """Measure real training steps on this machine's GPU and compare them with the estimate.

    Under torchrun every rank measures on its LOCAL_RANK device and rank 0 writes one result per point, with
    every rank's peaks (`ranks`)."""
    from rich.console import Console

    from peftplan.profile import ranks
    from peftplan.profile import run as run_mod

    world = ranks.world_from_env()
    step_api = STEP_API

    settings = {"steps": steps, "warmup": warmup, "interval_s": interval_ms / 1e3, "nvml": nvml,
                "phase_sync": phase_sync, "impl": impl}
    from peftplan.planning.validate import MAX_GRID_POINTS

    max_points = None if yes else MAX_GRID_POINTS  # counted before any point is built
    try:
        if grid is not None:
            from peftplan.profile.grid import load_grid

            points = load_grid(grid, defaults=settings, max_points=max_points)  # the file's values win
        else:
            points = points_from_options(model, method, r, alpha, dropout, targets, adapter_size,
                                         adapter_placement, top_k, batch_size, seq_len, dtype, optimizer, foreach,
                                         grad_checkpointing, attention, double_quant, kbit_prep, settings,
                                         max_points, adapter_dtype=adapter_dtype, use_dora=dora, autocast=autocast,
                                         grad_accum=grad_accum, max_grad_norm=max_grad_norm,
                                         use_reentrant=use_reentrant, logits_shift_copy=logits_shift_copy)
        Settings(**settings)  # bad settings are an input error even for a grid file
        for name in dict.fromkeys(p.model for p in points):
            run_mod.load_card(name)  # an unknown card is an input error, before any GPU work
        ranks.init(world)
        if dry_run:
            session, step_api = dry_session()
        else:
            session = make_session(world.local_rank if world.size > 1 else device, nvml)
    except (GpuUnavailable, PlanError) as e:
        typer.echo(f"peftplan: error: {e}", err=True)
        raise typer.Exit(2)

    from peftplan.profile.grid import run_grid
    from peftplan.profile.store import save

    def run_point(p):
        m = run_mod.profile_point(session, p.model, p.plan, p.settings, step_api=step_api, with_trace=trace)
        return ranks.gather(world, m) or m  # rank 0: merged; the others keep theirs, unsaved

    deadline = time.monotonic() + budget_s if budget_s else None
    if not world.is_main:  # the other ranks measure and send; rank 0 saves and reports
        run_grid(points, run_point, isolate=lambda: run_mod.isolate(session.backend), deadline=deadline)
        ranks.close(world)
        return
    with ProgressBar() as bar:
        result = run_grid(points, run_point, save=lambda m: save(m, out),
                          isolate=lambda: run_mod.isolate(session.backend), observer=bar, deadline=deadline)
    ranks.close(world)
    if json_out:
        typer.echo(json.dumps([m.to_dict() for m in result.measurements], indent=1))
    else:
        console = Console()
        for m in result.measurements:
            render_measurement(console, m)
        if len(result.measurements) > 1:
            render_summary(console, result.measurements)
    for e in result.errors:
        typer.echo(f"peftplan: error: {e}", err=True)
    counts = result.counts
    typer.echo(f"peftplan: {len(result.measurements)} result(s) in {out} (ok {counts['ok']}, "
               f"does not fit {counts['does-not-fit']}, failed {counts['error']})", err=True)
    if result.stopped_early:
        why = "interrupted" if result.interrupted else "out of time" if result.out_of_time else "aborted"
        typer.echo(f"peftplan: {why}: {len(result.not_run)} point(s) not run; finished results are saved",
                   err=True)
        raise typer.Exit(130 if result.interrupted else 3)


def register(app: typer.Typer) -> None:
    """Add `profile` to the peftplan app."""
    app.command("profile")(profile)
