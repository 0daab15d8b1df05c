"""Hold the analytic estimate to the trace: per-configuration errors and a summary over a grid."""
from __future__ import annotations

import itertools
import statistics
from dataclasses import dataclass

from peftplan.planning.cards import ModelCard
from peftplan.plan import Plan
from peftplan.results import Estimate, Memory
from peftplan.trace.run import Trace

# estimate Memory field  <->  trace category
COMPONENTS = {
    "frozen_weights_bytes": "frozen_weights",
    "trainable_weights_bytes": "trainable_weights",
    "gradients_bytes": "gradients",
    "optimizer_states_bytes": "optimizer_states",
    "activations_bytes": "activations",
    "logits_bytes": "logits",
    "temporaries_bytes": "temporaries",
    "communication_bytes": "communication",  # FSDP2: gathered units, reduce-scatter inputs (trace/distributed.py)
}


@dataclass(frozen=True)
class Comparison:
    model: str
    plan: Plan
    estimate_peak_bytes: int  # tensor bytes (what the trace counts) at the estimate's peak phase
    trace_peak_bytes: int
    peak_error: float  # (estimate − trace) / trace
    estimate_phase: str
    trace_phase: str
    phase_errors: dict[str, float]  # per phase, tensor bytes
    component_errors: dict[str, float]  # at the trace's peak phase, relative to the trace's peak
    trace_seconds: float


def one_line(error: BaseException | str, limit: int = 160) -> str:
    """An error as one short line: its first non-empty line, cut at `limit` characters (a FAIL row of
    `check`; transformers' messages run to kilobytes)."""
    text = next((ln.strip() for ln in str(error).splitlines() if ln.strip()), type(error).__name__)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def signed_error(predicted: float, measured: float) -> float:
    return (predicted - measured) / measured if measured else (0.0 if predicted == 0 else float("inf"))


def compare(est: Estimate, tr: Trace) -> Comparison:
    by_phase: dict[str, Memory] = {m.phase: m for m in est.phases}
    est_peak = max(est.phases, key=lambda m: m.tensor_bytes)
    tp = tr.peak
    phase_errors = {p.phase: signed_error(by_phase[p.phase].tensor_bytes, p.peak_bytes) for p in tr.phases}
    mem = by_phase[tp.phase]
    # component errors as a share of the peak, so a tiny component's noise does not dominate
    component_errors = {
        field: (getattr(mem, field) - tp.by_category_bytes.get(cat, 0)) / tp.peak_bytes
        for field, cat in COMPONENTS.items()
    }
    return Comparison(model=est.model, plan=est.plan, estimate_peak_bytes=est_peak.tensor_bytes,
                      trace_peak_bytes=tp.peak_bytes, peak_error=signed_error(est_peak.tensor_bytes, tp.peak_bytes),
                      estimate_phase=est_peak.phase, trace_phase=tp.phase, phase_errors=phase_errors,
                      component_errors=component_errors, trace_seconds=tr.seconds)


@dataclass(frozen=True)
class Summary:
    n: int
    median_abs_error: float
    p90_abs_error: float
    max_abs_error: float
    within_2pct: int
    failures: tuple[str, ...]  # configurations the tracer could not run, with the reason


def summarize(results: list[Comparison], failures: list[str] | None = None) -> Summary:
    errs = sorted(abs(c.peak_error) for c in results)
    if not errs:
        return Summary(0, 0.0, 0.0, 0.0, 0, tuple(failures or ()))
    p90 = errs[min(len(errs) - 1, int(round(0.9 * (len(errs) - 1))))]
    return Summary(len(errs), statistics.median(errs), p90, errs[-1], sum(e <= 0.02 for e in errs),
                   tuple(failures or ()))


def grid(cards: list[ModelCard], methods=("full", "adapter", "lora", "qlora"), ranks=(8, 64), batches=(1, 4),
         seqs=(128, 512), checkpointing=(False, True), attentions=("sdpa", "eager"),
         optimizers=("adamw",)) -> list[tuple[ModelCard, Plan]]:
    """The cartesian grid of (card, plan); LoRA ranks only vary for LoRA methods."""
    out = []
    for card, method, b, s, gc, attn, opt in itertools.product(cards, methods, batches, seqs, checkpointing,
                                                                attentions, optimizers):
        for r in (ranks if method in ("lora", "qlora") else ranks[:1]):
            out.append((card, Plan(method=method, r=r, batch_size=b, seq_len=s, grad_checkpointing=gc,
                                   attention=attn, optimizer=opt)))
    return out


@dataclass(frozen=True)
class GridRun:
    """What `run_grid` measured: the comparisons, the FAIL rows ("label: reason") and one JSON row each."""
    results: list[Comparison]
    failures: list[str]
    rows: list[dict]


def run_grid(configs: list[tuple[str, ModelCard, Plan]], extra=None, echo=print) -> GridRun:
    """Estimate and trace each labelled (card, plan), printing one line each (`[i/n] ok|OUT|FAIL label: error`):
    a configuration that cannot be estimated or traced is a FAIL row with its reason and the others go on
    (the benchmarks/check_*.py scripts). `extra(card, comparison) -> dict` adds fields to a row."""
    from peftplan.errors import PlanError
    from peftplan.planning import estimate
    from peftplan.trace.run import trace

    results, failures, rows = [], [], []
    for i, (label, card, plan) in enumerate(configs, 1):
        try:
            c = compare(estimate(card, plan), trace(card, plan))
        except PlanError as e:
            failures.append(f"{label}: {one_line(e)}")
            echo(f"[{i}/{len(configs)}] FAIL {label}: {one_line(e)}", flush=True)
            continue
        results.append(c)
        rows.append({"config": label, "peak_error": c.peak_error, "phase_errors": c.phase_errors,
                     "trace_peak_bytes": c.trace_peak_bytes, "estimate_peak_bytes": c.estimate_peak_bytes,
                     "phase": c.trace_phase, "trace_seconds": round(c.trace_seconds, 2),
                     **(extra(card, c) if extra else {})})
        echo(f"[{i}/{len(configs)}] {'ok ' if abs(c.peak_error) <= 0.02 else 'OUT'} {label}: "
             f"{100 * c.peak_error:+.2f}% ({c.trace_phase}, {c.trace_peak_bytes / 2**30:.2f} GiB traced, "
             f"{c.trace_seconds:.1f} s)", flush=True)
    return GridRun(results, failures, rows)


def save_grid(out, summary: Summary, rows: list[dict], seconds: float, **extra) -> str:
    """Write a grid benchmark's results file atomically ({"summary", **extra, "results"}) and return its summary
    line ("N configurations in T s: median |error| ..., p90 ..., max ...; K within 2%; F failed")."""
    import json
    from dataclasses import asdict

    from peftplan.profile.store import write_atomic

    write_atomic(out, json.dumps({"summary": asdict(summary), **extra, "results": rows}, indent=1))
    return (f"\n{summary.n} configurations in {seconds:.0f} s: median |error| {100 * summary.median_abs_error:.2f}%, "
            f"p90 {100 * summary.p90_abs_error:.2f}%, max {100 * summary.max_abs_error:.2f}%; {summary.within_2pct} "
            f"within 2%; {len(summary.failures)} failed")
