"""Every figure of the report as typed, frozen data, computed from the analytic estimate (and measured files).

Nothing here renders: `html.py` turns a `ReportData` into a page, and the same objects could feed any other
renderer. Sizes are bytes and counts are exact integers; conversion to GiB happens at rendering.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from peftplan.planning.cards import ModelCard, load_card
from peftplan.errors import PlanError
from peftplan.planning import estimate
from peftplan.planning.fit import FitMatrix, fit_matrix
from peftplan.plan import Plan
from peftplan.report.measured import MEASURED_DIR, Measured, read_measured
from peftplan.results import Memory

DEFAULT_METHODS = ("full", "adapter", "lora", "qlora")
BATCHES = (1, 2, 4, 8, 16, 32, 64)
SEQS = (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
RANKS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Stacking order of the breakdown, bottom to top: what the weights cost first, then what the step adds.
COMPONENTS = tuple(k for k in Memory.__dataclass_fields__ if k.endswith("_bytes"))


@dataclass(frozen=True)
class GpuInfo:
    name: str
    full_name: str
    usable_memory_bytes: int
    price_per_hour_usd: float


@dataclass(frozen=True)
class Breakdown:
    """Components of the peak phase, per method, at one (b, s)."""

    model: str
    batch_size: int
    seq_len: int
    methods: tuple[str, ...]
    peak_phases: tuple[str, ...]  # per method: the phase that sets the peak
    components: tuple[str, ...]  # Memory field names, stacking order
    bytes: tuple[tuple[int, ...], ...]  # [component][method]
    peak_bytes: tuple[int, ...]  # per method (the sum of the components)


@dataclass(frozen=True)
class Series:
    name: str
    x: tuple[int, ...]
    y: tuple[int, ...]


@dataclass(frozen=True)
class Sweep:
    """Device peak bytes against one plan field, one series per method."""

    model: str
    field: str  # batch_size | seq_len
    fixed: str  # the other shape, e.g. "s = 512"
    series: tuple[Series, ...]


@dataclass(frozen=True)
class RankSweep:
    """LoRA rank r against trainable parameters and device peak, per LoRA-family method."""

    model: str
    batch_size: int
    seq_len: int
    trainable: tuple[Series, ...]
    peak_bytes: tuple[Series, ...]


@dataclass(frozen=True)
class Checkpointing:
    """Gradient checkpointing off and on, per method: memory saved against extra FLOPs."""

    model: str
    batch_size: int
    seq_len: int
    methods: tuple[str, ...]
    peak_off_bytes: tuple[int, ...]
    peak_on_bytes: tuple[int, ...]
    flops_ratio: tuple[float, ...]  # FLOPs per token on / off (recompute of the forward)


@dataclass(frozen=True)
class CostCell:
    gpu: str
    method: str
    fits: bool  # at the report's (b, s)
    tokens_per_s: float | None  # None: the card cannot run the plan (`note` says why, e.g. no bf16 on a T4)
    usd_per_million_tokens: float | None
    gpu_hours: float | None  # for the token budget (0 without one)
    cost_usd: float | None
    note: str = ""


@dataclass(frozen=True)
class Throughput:
    model: str
    tokens: int
    batch_size: int
    seq_len: int
    cells: tuple[CostCell, ...]  # gpus × methods


@dataclass(frozen=True)
class ClusterRow:
    """One method on W GPUs of one card: the per-GPU peak and what the cluster costs."""

    method: str
    gpus: int  # W
    strategy: str  # "none" for one GPU
    fits: bool
    tokens_per_s: float  # the whole cluster (data parallel; communication time not modelled)
    usd_per_hour: float  # the whole cluster
    cost_usd: float  # for the token budget (0 without one)


@dataclass(frozen=True)
class PerGpu:
    """Per-GPU breakdowns at W = 1, 2, 4, 8 (`distributed.shard_phases`), on the report's first GPU card."""

    gpu: str
    strategy: str
    breakdown: Breakdown  # its `methods` are labels "method ×W"
    rows: tuple[ClusterRow, ...]


@dataclass(frozen=True)
class ModelSection:
    model: str
    source: str
    total_params: int
    breakdown: Breakdown
    by_batch: Sweep
    by_seq: Sweep
    ranks: RankSweep
    checkpointing: Checkpointing
    throughput: Throughput
    per_gpu: PerGpu | None = None


@dataclass(frozen=True)
class ReportData:
    models: tuple[str, ...]
    gpus: tuple[GpuInfo, ...]
    methods: tuple[str, ...]
    base: Plan  # the shared plan fields; method, b and s vary per figure
    batch_size: int
    seq_len: int
    tokens: int
    fit: FitMatrix
    sections: tuple[ModelSection, ...]
    measured: Measured

    def fits_nowhere(self) -> tuple[str, ...]:
        """Models that no chosen GPU holds with any chosen method, at b = 1 and s = seq_len."""
        return tuple(m for m in self.models if self.fit.fits_nowhere(m))


# ---------------------------------------------------------------- figures, one function each


def breakdown(card: ModelCard, plans: Sequence[Plan]) -> Breakdown:
    peaks = [estimate(card, p).peak for p in plans]
    return Breakdown(
        model=card.name, batch_size=plans[0].batch_size, seq_len=plans[0].seq_len,
        methods=tuple(p.method for p in plans), peak_phases=tuple(m.phase for m in peaks), components=COMPONENTS,
        bytes=tuple(tuple(getattr(m, c) for m in peaks) for c in COMPONENTS),
        peak_bytes=tuple(m.device_bytes for m in peaks),
    )


def sweep(card: ModelCard, plans: Sequence[Plan], field: str, values: Sequence[int]) -> Sweep:
    series = tuple(
        Series(p.method, tuple(values), tuple(estimate(card, p.with_(**{field: v})).peak_bytes for v in values))
        for p in plans
    )
    p0 = plans[0]
    fixed = f"s = {p0.seq_len}" if field == "batch_size" else f"b = {p0.batch_size}"
    return Sweep(model=card.name, field=field, fixed=fixed, series=series)


def seq_values(card: ModelCard) -> tuple[int, ...]:
    """Powers of two up to the model's positions (at least the shortest one)."""
    return tuple(s for s in SEQS if s <= card.max_positions) or (SEQS[0],)


def rank_sweep(card: ModelCard, plans: Sequence[Plan]) -> RankSweep:
    lora = [p for p in plans if p.uses_lora] or [plans[0].with_(method="lora")]
    trainable, peaks = [], []
    for p in lora:
        points = []
        for r in RANKS:
            try:
                points.append((r, estimate(card, p.with_(r=r))))
            except PlanError:  # r larger than a targeted matrix: the sweep stops short
                break
        trainable.append(Series(p.method, tuple(r for r, _ in points), tuple(e.params.trainable for _, e in points)))
        peaks.append(Series(p.method, tuple(r for r, _ in points), tuple(e.peak_bytes for _, e in points)))
    return RankSweep(model=card.name, batch_size=lora[0].batch_size, seq_len=lora[0].seq_len,
                     trainable=tuple(trainable), peak_bytes=tuple(peaks))


def checkpointing(card: ModelCard, plans: Sequence[Plan]) -> Checkpointing:
    off = [p.with_(grad_checkpointing=False) for p in plans]
    on = [p.with_(grad_checkpointing=True) for p in plans]
    return Checkpointing(
        model=card.name, batch_size=plans[0].batch_size, seq_len=plans[0].seq_len,
        methods=tuple(p.method for p in plans), peak_off_bytes=tuple(estimate(card, p).peak_bytes for p in off),
        peak_on_bytes=tuple(estimate(card, p).peak_bytes for p in on),
        flops_ratio=tuple(_flops_per_token(card, b) / _flops_per_token(card, a) for a, b in zip(off, on)),
    )


def _flops_per_token(card: ModelCard, plan: Plan) -> float:
    from peftplan.planning.params import count
    from peftplan.planning.timing import flops_per_token

    return flops_per_token(card, plan, count(card, plan))


def cost_cell(card: ModelCard, plan: Plan, gpu: GpuInfo, tokens: int) -> CostCell:
    try:
        e = estimate(card, plan, gpu=gpu.name, tokens=tokens)
    except PlanError as err:  # the card cannot run the plan at all (a dtype it lacks): say so in its cell
        fits = estimate(card, plan).peak_bytes <= gpu.usable_memory_bytes
        return CostCell(gpu=gpu.name, method=plan.method, fits=fits, tokens_per_s=None, usd_per_million_tokens=None,
                        gpu_hours=None, cost_usd=None, note=str(err))
    t = e.time
    return CostCell(gpu=gpu.name, method=plan.method, fits=bool(e.fits), tokens_per_s=t.tokens_per_s,
                    usd_per_million_tokens=1e6 / t.tokens_per_s / 3600.0 * gpu.price_per_hour_usd,
                    gpu_hours=t.gpu_hours, cost_usd=t.cost_usd, note="; ".join(e.warnings))


def throughput(card: ModelCard, plans: Sequence[Plan], gpus: Sequence[GpuInfo], tokens: int) -> Throughput:
    cells = tuple(cost_cell(card, p, g, tokens) for g in gpus for p in plans)
    return Throughput(model=card.name, tokens=tokens, batch_size=plans[0].batch_size, seq_len=plans[0].seq_len,
                      cells=cells)


WORLD_SIZES = (1, 2, 4, 8)


def per_gpu(card: ModelCard, plans: Sequence[Plan], gpu: GpuInfo, tokens: int, strategy: str = "fsdp") -> PerGpu:
    """Each plan on W = 1, 2, 4, 8 GPUs of `gpu` under `strategy` (one node): the per-GPU peak components and the
    cluster's throughput, price per hour and cost (W × the card's price; GPU-hours of a budget do not change
    with W, see planning/cluster.py)."""
    labels, peaks, rows = [], [], []
    for p in plans:
        for w in WORLD_SIZES:
            s = strategy if w > 1 else "none"
            e = estimate(card, p.with_(gpus=w, nodes=1, strategy=s), gpu=gpu.name, tokens=tokens)
            labels.append(f"{p.method} ×{w}")
            peaks.append(e.peak)
            t = e.time
            rows.append(ClusterRow(method=p.method, gpus=w, strategy=s, fits=bool(e.fits),
                                   tokens_per_s=t.tokens_per_s * w if t else 0.0,
                                   usd_per_hour=gpu.price_per_hour_usd * w, cost_usd=t.cost_usd if t else 0.0))
    b = Breakdown(model=card.name, batch_size=plans[0].batch_size, seq_len=plans[0].seq_len, methods=tuple(labels),
                  peak_phases=tuple(m.phase for m in peaks), components=COMPONENTS,
                  bytes=tuple(tuple(getattr(m, c) for m in peaks) for c in COMPONENTS),
                  peak_bytes=tuple(m.device_bytes for m in peaks))
    return PerGpu(gpu=gpu.name, strategy=strategy, breakdown=b, rows=tuple(rows))


def model_section(card: ModelCard, plans: Sequence[Plan], gpus: Sequence[GpuInfo], tokens: int) -> ModelSection:
    from peftplan.planning.params import total_params

    return ModelSection(
        model=card.name, source=card.source, total_params=total_params(card),
        breakdown=breakdown(card, plans),
        by_batch=sweep(card, plans, "batch_size", BATCHES),
        by_seq=sweep(card, plans, "seq_len", seq_values(card)),
        ranks=rank_sweep(card, plans),
        checkpointing=checkpointing(card, plans),
        throughput=throughput(card, plans, gpus, tokens),
        per_gpu=per_gpu(card, plans, gpus[0], tokens) if gpus else None,
    )


# ---------------------------------------------------------------- the whole report


def _gpu_info(gpu) -> GpuInfo:
    from peftplan.planning.gpus import load_gpu

    g = load_gpu(gpu) if isinstance(gpu, str) else gpu
    return GpuInfo(name=g.name, full_name=g.full_name, usable_memory_bytes=g.usable_memory_bytes,
                   price_per_hour_usd=g.price_per_hour_usd)


def _unique(cards: Sequence[ModelCard]) -> list[ModelCard]:
    """One card per name: the matrix and the sections are keyed by it."""
    seen: dict[str, ModelCard] = {}
    for c in cards:
        seen.setdefault(c.name, c)
    return list(seen.values())


def report_data(models: Sequence[str | ModelCard], gpus: Sequence, methods: Sequence[str] = DEFAULT_METHODS,
                seq_len: int = 512, batch_size: int = 1, tokens: int = 0, base: Plan | None = None,
                measured_dir: Path | None = MEASURED_DIR) -> ReportData:
    """Compute every figure of the report. Raises PlanError for an unknown model, GPU or method.

    `measured_dir=None` leaves measured results out (the section then says so).
    """
    if not models:
        raise PlanError("a report needs at least one model")
    if not gpus:
        raise PlanError("a report needs at least one GPU")
    if not methods:
        raise PlanError("a report needs at least one method")
    cards = _unique([m if isinstance(m, ModelCard) else load_card(m) for m in models])
    gpu_infos = tuple(_gpu_info(g) for g in dict.fromkeys(gpus))
    base = base or Plan()
    plans = [base.with_method(m, batch_size=batch_size, seq_len=seq_len) for m in dict.fromkeys(methods)]
    fit = fit_matrix(cards, [g.name for g in gpu_infos], [p.method for p in plans], seq_len, base=base)
    names = tuple(c.name for c in cards)
    return ReportData(
        models=names, gpus=gpu_infos, methods=tuple(p.method for p in plans), base=base,
        batch_size=batch_size, seq_len=seq_len, tokens=int(tokens), fit=fit,
        sections=tuple(model_section(c, plans, gpu_infos, int(tokens)) for c in cards),
        measured=read_measured(measured_dir, names) if measured_dir is not None else Measured.empty(),
    )
