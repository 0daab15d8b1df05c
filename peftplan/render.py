"""Rich rendering of planner results for the terminal. Nothing here computes."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from peftplan.results import Estimate, Memory

COMPONENTS = {
    "frozen_weights_bytes": "frozen weights",
    "trainable_weights_bytes": "trainable weights",
    "gradients_bytes": "gradients",
    "optimizer_states_bytes": "optimizer states",
    "activations_bytes": "activations",
    "logits_bytes": "logits + loss",
    "temporaries_bytes": "temporaries",
    "allocator_overhead_bytes": "allocator overhead",
    "cuda_context_bytes": "CUDA context + cuBLAS",
}


def gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def count(n: int) -> str:
    return f"{n:,}"


def _params_table(est: Estimate) -> Table:
    p = est.params
    t = Table(title=f"{est.model} · {est.plan.method} · parameters", title_justify="left")
    t.add_column("")
    t.add_column("count", justify="right")
    t.add_row("base model", count(p.base))
    if p.added:
        t.add_row("added by the method", count(p.added))
    t.add_row("trainable", f"{count(p.trainable)} ({p.trainable_percent:.4g}%)")
    t.add_row("frozen", count(p.frozen))
    if p.quantized:
        t.add_row("stored in NF4", f"{count(p.quantized)} in {p.quantized_tensors} tensors")
    if est.plan.uses_lora:
        t.add_row("LoRA targets", ", ".join(p.targets))
    return t


def _memory_table(est: Estimate) -> Table:
    peak = est.peak
    t = Table(title=f"peak memory by component (b={est.plan.batch_size}, s={est.plan.seq_len}, "
                    f"{est.plan.dtype}, {est.plan.optimizer}"
                    f"{', checkpointing' if est.plan.grad_checkpointing else ''}, {est.plan.attention})",
              title_justify="left")
    t.add_column("component")
    for m in est.phases:
        name = f"{m.phase} ★" if m is peak else m.phase
        t.add_column(name, justify="right")
    for key, label in COMPONENTS.items():
        t.add_row(label, *(gib(getattr(m, key)) for m in est.phases))
    t.add_section()
    t.add_row("tensors (torch allocated)", *(gib(m.tensor_bytes) for m in est.phases))
    t.add_row("torch reserved", *(gib(m.reserved_bytes) for m in est.phases))
    t.add_row("device (NVML)", *(gib(m.device_bytes) for m in est.phases), style="bold")
    return t


def _time_lines(est: Estimate) -> list[str]:
    lines = []
    if est.gpu_memory_bytes is not None:
        verdict = "fits" if est.fits else "does NOT fit"
        lines.append(f"{est.gpu}: {gib(est.gpu_memory_bytes)} usable → {verdict} "
                     f"(peak {gib(est.peak_bytes)}, {100 * est.peak_bytes / est.gpu_memory_bytes:.0f}%)")
    if est.time:
        tm = est.time
        lines.append(f"{tm.flops_per_token / 1e9:,.2f} GFLOP/token · {tm.step_time_s * 1e3:,.1f} ms/step · "
                     f"{tm.tokens_per_s:,.0f} tokens/s at {tm.utilisation:.0%} of {tm.peak_tflops:g} TFLOP/s")
        if tm.tokens:
            lines.append(f"{tm.tokens:,} tokens: {tm.gpu_hours:,.2f} GPU-hours · ${tm.cost_usd:,.2f}")
    return lines


def render_estimate(est: Estimate, console: Console | None = None) -> None:
    console = console or Console()
    console.print(_params_table(est))
    console.print(_memory_table(est))
    console.print(f"peak: [bold]{gib(est.peak_bytes)}[/bold] in the {est.peak.phase} phase "
                  f"({gib(est.peak.tensor_bytes)} of tensors)")
    for line in _time_lines(est):
        console.print(line)


def render_compare(results: list[Estimate], console: Console | None = None) -> None:
    console = console or Console()
    first = results[0]
    t = Table(title=f"{first.model}: methods side by side (b={first.plan.batch_size}, s={first.plan.seq_len})",
              title_justify="left")
    for col in ("method", "trainable", "%", "peak", "phase", "tensors"):
        t.add_column(col, justify="right" if col not in ("method", "phase") else "left")
    if first.gpu:
        t.add_column(f"fits {first.gpu}")
        t.add_column("tokens/s", justify="right")
    for est in results:
        row = [est.plan.method, count(est.params.trainable), f"{est.params.trainable_percent:.3g}",
               gib(est.peak_bytes), est.peak.phase, gib(est.peak.tensor_bytes)]
        if first.gpu:
            row += ["yes" if est.fits else "no", f"{est.time.tokens_per_s:,.0f}"]
        t.add_row(*row)
    console.print(t)


def render_models(cards, console: Console | None = None) -> None:
    """The cards grouped by family (model type), each with total and active parameters (MoE: per token)."""
    from peftplan.planning.params import active_params, total_params

    console = console or Console()
    t = Table(title="model cards", title_justify="left")
    for col in ("family", "name", "params", "active", "d", "L", "h", "kv", "d_ff", "V", "tied"):
        t.add_column(col, justify="left" if col in ("family", "name") else "right")
    rows = sorted(cards, key=lambda c: (c.family, total_params(c)))
    for i, c in enumerate(rows):
        if i and c.family != rows[i - 1].family:
            t.add_section()
        total, active = total_params(c), active_params(c)
        t.add_row(c.family if not i or c.family != rows[i - 1].family else "", c.name, count(total),
                  count(active) if active != total else "", str(c.d_model), str(c.n_layers), str(c.n_heads),
                  str(c.n_kv_heads), str(c.d_ff), str(c.vocab_size), "yes" if c.tie_embeddings else "no")
    console.print(t)


def render_gpus(gpus, console: Console | None = None) -> None:
    console = console or Console()
    t = Table(title="GPU cards", title_justify="left")
    for col in ("name", "GPU", "memory", "usable", "bf16 TFLOP/s", "fp16 TFLOP/s", "GB/s", "$/h"):
        t.add_column(col, justify="left" if col in ("name", "GPU") else "right")
    for g in gpus:
        t.add_row(g.name, g.full_name, gib(g.memory_bytes), gib(g.usable_memory_bytes), f"{g.bf16_tflops:g}",
                  f"{g.fp16_tflops:g}", f"{g.mem_bandwidth_gbs:g}", f"{g.price_per_hour_usd:.2f}")
    console.print(t)


__all__ = ["render_estimate", "render_compare", "render_models", "render_gpus", "Memory"]
