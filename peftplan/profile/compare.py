"""Measured figures beside the estimate (and the trace): signed errors and their summary over a grid.

Pure maths on plain numbers and the typed results; nothing here touches a GPU. Errors are signed,
(predicted − measured) / measured: positive means the plan predicts more memory (or more tokens/s) than the
GPU showed.

What each measured figure answers for (estimate `Memory` at the same phase):
    <phase>.peak_allocated   torch.cuda.max_memory_allocated   Memory.tensor_bytes
    <phase>.peak_reserved    torch.cuda.max_memory_reserved    Memory.reserved_bytes
    <phase>.device           NVML peak − NVML idle             Memory.device_bytes (reserved + context)
    peak.*                   the largest phase of each side
    weights                  allocated after the model is built  frozen + trainable weights
    optimizer_states         allocated at a step's start − weights  optimizer states (grads are None then)
    cuda_context             NVML after CUDA init − NVML idle    cuda_context_bytes
    non_torch                peak.device − peak reserved         cuda_context_bytes (context, lazily loaded
                             kernels, library workspaces outside torch's allocator)
    allocator_overhead       reserved − allocated at the peak    allocator_overhead_bytes
"""
from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from peftplan.profile.store import CompareRow, Measurement, ThroughputRow

PHASES = ("forward", "backward", "optimizer")


def rel_error(predicted: float, measured: float) -> float | None:
    """(predicted − measured) / measured; None when nothing was measured."""
    return (predicted - measured) / measured if measured else None


def row(name: str, measured: int, predicted: int, reference: str = "estimate") -> CompareRow:
    return CompareRow(name=name, reference=reference, measured_bytes=int(measured), predicted_bytes=int(predicted),
                      error_bytes=int(predicted) - int(measured), rel_error=rel_error(predicted, measured))


def _memory(phase: dict) -> dict[str, int]:
    """tensor/reserved/device bytes of one phase of `Estimate.to_dict()`."""
    comps = {k: int(v) for k, v in phase.items() if k.endswith("_bytes")}
    tensor = sum(v for k, v in comps.items() if k not in ("cuda_context_bytes", "allocator_overhead_bytes"))
    reserved = tensor + comps.get("allocator_overhead_bytes", 0)
    return {"tensor": tensor, "reserved": reserved, "device": reserved + comps.get("cuda_context_bytes", 0),
            **comps}


def predicted_phases(predicted: Mapping) -> dict[str, dict[str, int]]:
    return {p["phase"]: _memory(p) for p in predicted.get("phases", ())}


def memory_rows(m: Measurement) -> tuple[CompareRow, ...]:
    """Every memory figure of `m` beside `m.predicted` (the estimate's dict)."""
    if not m.predicted or m.status != "ok":
        return ()
    pred = predicted_phases(m.predicted)
    idle = m.nvml.idle_bytes if m.nvml else 0
    out = []
    measured_device = {}
    for ph in m.phases:
        p = pred.get(ph.phase)
        if p is None:
            continue
        out.append(row(f"{ph.phase}.peak_allocated", ph.peak_allocated_bytes, p["tensor"]))
        out.append(row(f"{ph.phase}.peak_reserved", ph.peak_reserved_bytes, p["reserved"]))
        if ph.nvml_peak_bytes is not None and m.nvml:
            measured_device[ph.phase] = ph.nvml_peak_bytes - idle
            out.append(row(f"{ph.phase}.device", measured_device[ph.phase], p["device"]))
    if pred and m.phases:
        out.append(row("peak.allocated", m.peak_allocated_bytes, max(p["tensor"] for p in pred.values())))
        out.append(row("peak.reserved", m.peak_reserved_bytes, max(p["reserved"] for p in pred.values())))
        if measured_device:
            out.append(row("peak.device", max(measured_device.values()), max(p["device"] for p in pred.values())))
        first = pred.get("forward") or next(iter(pred.values()))
        out.append(row("weights", m.weights_allocated_bytes,
                       first.get("frozen_weights_bytes", 0) + first.get("trainable_weights_bytes", 0)))
        out.append(row("optimizer_states", m.step_start_allocated_bytes - m.weights_allocated_bytes,
                       first.get("optimizer_states_bytes", 0)))
        peak_phase = max(m.phases, key=lambda ph: ph.peak_reserved_bytes)
        if peak_phase.phase in pred:
            p = pred[peak_phase.phase]
            out.append(row("allocator_overhead", peak_phase.peak_reserved_bytes - peak_phase.peak_allocated_bytes,
                           p.get("allocator_overhead_bytes", 0)))
            if m.nvml:
                out.append(row("cuda_context", m.nvml.context_bytes - m.nvml.idle_bytes,
                               p.get("cuda_context_bytes", 0)))
            if measured_device:
                # kernels load lazily and cuBLAS/cuDNN/bitsandbytes add their own: what NVML sees beyond torch
                out.append(row("non_torch", max(measured_device.values()) - m.peak_reserved_bytes,
                               p.get("cuda_context_bytes", 0)))
    return tuple(out)


def trace_rows(m: Measurement, traced: Mapping[str, int]) -> tuple[CompareRow, ...]:
    """Torch's peak allocated per phase beside the fake-tensor trace's peak (both count tensor bytes)."""
    out = [row(f"trace.{ph.phase}.peak_allocated", ph.peak_allocated_bytes, traced[ph.phase], "trace")
           for ph in m.phases if ph.phase in traced]
    if out:
        out.append(row("trace.peak.allocated", m.peak_allocated_bytes, max(traced.values()), "trace"))
    return tuple(out)


def throughput_row(m: Measurement) -> ThroughputRow | None:
    t = (m.predicted or {}).get("time")
    if not t or not m.timing or m.status != "ok":
        return None
    measured, predicted = m.timing.tokens_per_s, float(t["tokens_per_s"])
    return ThroughputRow(measured_tokens_per_s=measured, predicted_tokens_per_s=predicted,
                         rel_error=rel_error(predicted, measured) or 0.0,
                         measured_utilisation=m.timing.utilisation, predicted_utilisation=float(t["utilisation"]))


# ---------------------------------------------------------------- over a grid


@dataclass(frozen=True)
class ErrorSummary:
    metric: str
    n: int
    median_abs_error: float
    max_abs_error: float
    worst: str  # the configuration with the largest |error|
    bias: float  # median signed error: > 0 the estimate predicts too much

    def within(self, median_bound: float, max_bound: float) -> bool:
        return self.n > 0 and self.median_abs_error <= median_bound and self.max_abs_error <= max_bound


def summarise(metric: str, errors: Sequence[tuple[str, float]]) -> ErrorSummary:
    """Median and max |error| of (label, signed error) pairs."""
    if not errors:
        return ErrorSummary(metric, 0, 0.0, 0.0, "", 0.0)
    worst = max(errors, key=lambda e: abs(e[1]))
    return ErrorSummary(metric=metric, n=len(errors), median_abs_error=statistics.median(abs(e) for _, e in errors),
                        max_abs_error=abs(worst[1]), worst=worst[0], bias=statistics.median(e for _, e in errors))


def grid_summary(measurements: Iterable[Measurement],
                 metrics: Sequence[str] = ("peak.reserved", "peak.allocated", "peak.device")) -> list[ErrorSummary]:
    """Error summaries over the measurements that ran, one per memory metric, plus tokens/s."""
    ok = [m for m in measurements if m.status == "ok"]
    out = []
    for metric in metrics:
        errs = [(f"{m.model} {m.key}", r.rel_error) for m in ok for r in m.comparison
                if r.name == metric and r.rel_error is not None]
        out.append(summarise(metric, errs))
    out.append(summarise("tokens_per_s", [(f"{m.model} {m.key}", m.throughput.rel_error) for m in ok
                                          if m.throughput]))
    return out
