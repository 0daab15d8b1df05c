"""Rich rendering of planner results for the terminal. Nothing here computes."""
from __future__ import annotations

from rich.console import Console
from rich.markup import escape
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
    "communication_bytes": "gathered params + buckets",
}


def safe(text: object) -> str:
    """A user's string (model name from a config.json or a path, a GPU or target name) for rich: markup
    escaped (`[/]` prints as itself) and control characters (newline, ESC/ANSI, OSC) shown as escapes."""
    return escape("".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text)))


def gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def count(n: int) -> str:
    return f"{n:,}"


def _params_table(est: Estimate) -> Table:
    p = est.params
    t = Table(title=f"{safe(est.model)} · {est.plan.method} · parameters", title_justify="left")
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
        t.add_row("LoRA targets", safe(", ".join(target_groups(p.targets))))
    return t


def target_groups(targets) -> list[str]:
    """Target names with a repeated stack's index as '*' and the count: 48 names of T5's encoder read as
    'encoder.block.*.layer.0.SelfAttention.q (×24)', ...; block-relative names stay as they are."""
    import re

    groups: dict[str, list[str]] = {}
    for name in targets:
        groups.setdefault(re.sub(r"\.\d+\.", ".*.", name, count=1), []).append(name)
    return [names[0] if len(names) == 1 else f"{key} (×{len(names)})" for key, names in groups.items()]


def _stack_summary(plan) -> str:
    """The options that shape the breakdown, as the title names them: b, s, weights' dtype, autocast,
    accumulation, optimizer, checkpointing, attention (defaults that change nothing are left out)."""
    parts = [f"b={plan.batch_size}", f"s={plan.seq_len}", plan.dtype]
    if plan.autocast != "none":
        parts.append(f"{plan.autocast} autocast")
    if plan.grad_accum > 1:
        parts.append(f"grad-accum {plan.grad_accum}")
    parts.append(plan.optimizer)
    if plan.grad_checkpointing:
        parts.append("checkpointing (reentrant)" if plan.use_reentrant else "checkpointing")
    parts.append(plan.attention)
    return ", ".join(parts)


def _memory_table(est: Estimate) -> Table:
    peak = est.peak
    t = Table()  # its title is printed above it as a line of its own (a table title wraps to the table's width)
    t.add_column("component")
    for m in est.phases:
        name = f"{m.phase} ★" if m is peak else m.phase
        t.add_column(name, justify="right")
    for key, label in COMPONENTS.items():
        if key == "communication_bytes" and not any(m.communication_bytes for m in est.phases):
            continue
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
        lines.append(f"{safe(est.gpu)}: {gib(est.gpu_memory_bytes)} usable → {verdict} "
                     f"(peak {gib(est.peak_bytes)}, {100 * est.peak_bytes / est.gpu_memory_bytes:.0f}%)")
    if est.time:
        tm = est.time
        lines.append(f"{tm.flops_per_token / 1e9:,.2f} GFLOP/token · {tm.step_time_s * 1e3:,.1f} ms/step · "
                     f"{tm.tokens_per_s:,.0f} tokens/s ({tm.utilisation:.0%} MFU of {tm.peak_tflops:g} TFLOP/s)")
        lines.append(f"roofline per step: matmuls {tm.gemm_s * 1e3:,.1f} ms · attention {tm.attention_s * 1e3:,.1f} ms · "
                     f"memory-bound {tm.memory_s * 1e3:,.1f} ms · optimizer {tm.optimizer_s * 1e3:,.1f} ms")
        if tm.tokens:
            lines.append(f"{tm.tokens:,} tokens: {tm.gpu_hours:,.2f} GPU-hours · ${tm.cost_usd:,.2f}")
        if est.plan.gpus > 1:  # data parallel: the same GPU-hours, W times the rate (communication not modelled)
            wall = f" · {tm.gpu_hours / est.plan.gpus:,.2f} h wall-clock" if tm.tokens else ""
            lines.append(f"{est.plan.gpus} GPUs ({est.strategy}): {tm.tokens_per_s * est.plan.gpus:,.0f} tokens/s in "
                         f"all{wall} (communication time not modelled)")
    if est.cpu_offload_bytes:
        lines.append(f"CPU memory per rank for offloaded {est.plan.offload}: {gib(est.cpu_offload_bytes)}")
    return lines


def moe_line(m) -> str:
    """The routing the estimate assumes, both rules shown (planning/moe.py)."""
    return (f"MoE: E={m.n_experts}, k={m.experts_per_token}, {m.pairs:,} token-expert pairs per block; busiest "
            f"expert {m.busiest_expert_tokens_balanced:,} tokens balanced, {m.busiest_expert_tokens_worst:,} worst "
            f"({m.chosen} chosen); memory is the same under both (grouped-GEMM experts)")


def render_estimate(est: Estimate, console: Console | None = None) -> None:
    console = console or Console()
    console.print(_params_table(est))
    per_gpu = f"per GPU, {est.strategy} on {est.plan.gpus} GPUs, " if est.strategy != "none" else ""
    console.print(f"peak memory by component ({per_gpu}{_stack_summary(est.plan)})", highlight=False, soft_wrap=True)
    console.print(_memory_table(est))
    console.print(f"peak: [bold]{gib(est.peak_bytes)}[/bold] in the {est.peak.phase} phase "
                  f"({gib(est.peak.tensor_bytes)} of tensors)")
    if est.moe is not None:
        console.print(moe_line(est.moe))
    for line in _time_lines(est):
        console.print(line)


def render_compare(results: list[Estimate], console: Console | None = None) -> None:
    console = console or Console()
    first = results[0]
    t = Table(title=f"{safe(first.model)}: methods side by side (b={first.plan.batch_size}, s={first.plan.seq_len})",
              title_justify="left")
    for col in ("method", "trainable", "%", "peak", "phase", "tensors"):
        t.add_column(col, justify="right" if col not in ("method", "phase") else "left")
    if first.gpu:
        t.add_column(f"fits {safe(first.gpu)}")
        t.add_column("tokens/s", justify="right")
    for est in results:
        row = [est.plan.method, count(est.params.trainable), f"{est.params.trainable_percent:.3g}",
               gib(est.peak_bytes), est.peak.phase, gib(est.peak.tensor_bytes)]
        if first.gpu:
            row += ["yes" if est.fits else "no", f"{est.time.tokens_per_s:,.0f}"]
        t.add_row(*row)
    p = first.plan
    t.caption = (f"every method: {p.dtype} weights, autocast {p.autocast}, {p.optimizer}, {p.attention} attention, "
                 f"gradient checkpointing {'on' if p.grad_checkpointing else 'off'}, grad-accum {p.grad_accum}")
    t.caption_justify = "left"
    console.print(t)


def render_advice(adv, top: int = 10, console: Console | None = None) -> None:
    """The ranked configurations of `advise` (best first) and what was not searched."""
    from rich.markup import escape

    console = console or Console()
    limit = gib(adv.usable_bytes * (1 - adv.headroom))
    t = Table(title=f"{escape(adv.model)} · {adv.method} on {escape(adv.gpu)}: {adv.global_batch} sequences × "
                    f"{adv.seq_len} tokens per step, ≤ {limit} ({adv.headroom:.0%} headroom)", title_justify="left")
    for col in ("#", "b", "N", "b·N", "ckpt", "optimizer", "attn", "peak GiB", "tokens/s", "s/step"):
        t.add_column(col, justify="left" if col in ("optimizer", "attn", "ckpt") else "right", no_wrap=True,
                     min_width=len(col))
    for i, c in enumerate(adv.candidates[:max(top, 1)], 1):
        t.add_row(str(i), str(c.micro_batch), str(c.grad_accum), str(c.sequences_per_step),
                  "on" if c.plan.grad_checkpointing else "off", c.plan.optimizer, c.plan.attention,
                  f"{c.peak_bytes / 2**30:.2f}", f"{c.tokens_per_s:,.0f}", f"{c.step_time_s:.1f}")
    console.print(t)
    console.print("b: micro-batch (per_device_train_batch_size) · N: gradient_accumulation_steps", style="dim")
    for s in adv.skipped:
        console.print(f"not searched: {s}", style="dim")
    if adv.best is None:
        console.print("nothing fits: try QLoRA, a shorter --seq-len, less --headroom, or a larger card", style="red")
    elif adv.best.sequences_per_step != adv.global_batch:
        console.print(f"the micro-batch {adv.best.micro_batch} does not divide {adv.global_batch}: "
                      f"{adv.best.sequences_per_step} sequences per step", style="dim")


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
        t.add_row(c.family if not i or c.family != rows[i - 1].family else "", safe(c.name), count(total),
                  count(active) if active != total else "", str(c.d_model), str(c.n_layers), str(c.n_heads),
                  str(c.n_kv_heads), str(c.d_ff), str(c.vocab_size), "yes" if c.tie_embeddings else "no")
    console.print(t)


def render_gpus(gpus, console: Console | None = None) -> None:
    console = console or Console()
    t = Table(title="GPU cards", title_justify="left")
    for col in ("name", "GPU", "memory", "usable", "bf16 TFLOP/s", "fp16 TFLOP/s", "GB/s", "$/h"):
        t.add_column(col, justify="left" if col in ("name", "GPU") else "right")
    for g in gpus:
        t.add_row(safe(g.name), safe(g.full_name), gib(g.memory_bytes), gib(g.usable_memory_bytes), f"{g.bf16_tflops:g}",
                  f"{g.fp16_tflops:g}", f"{g.mem_bandwidth_gbs:g}", f"{g.price_per_hour_usd:.2f}")
    console.print(t)


__all__ = ["safe", "render_estimate", "render_compare", "render_models", "render_gpus", "Memory"]
