"""What fits where: the largest batch and the longest sequence a GPU card holds, by search over the estimate.

The analytic peak grows with the batch size b and the sequence length s (every activation term is linear in
b·s or in b·s², nothing shrinks), so the largest fitting value is found by an exponential search for the first
power of two that does not fit, then a binary search between it and the last one that did. A search costs
about 2·log2(answer) estimates; `fit_matrix` shares them between the GPUs of one model and method, since the
peak does not depend on the card.

"Fits" is `Estimate.fits`: the device peak (NVML's view) at most the card's usable memory.

Cost: each cell also carries the roofline throughput (planning/timing.py) at its largest fitting batch and the
price of a million training tokens there (the card's indicative $/hour); `FitMatrix.by_cost` ranks the cards.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from peftplan.planning.cards import ModelCard, load_card
from peftplan.planning.api import estimate
from peftplan.plan import Plan

MAX_BATCH = 1 << 16  # searches stop here; a cell that reaches it reads "at least"


# ---------------------------------------------------------------- search


def search_largest(fits: Callable[[int], bool], cap: int) -> int:
    """The largest n in [1, cap] with fits(n), for a monotone `fits`; 0 if fits(1) is false.

    Exponential search for the first failing power of two, then bisection.
    """
    if cap < 1 or not fits(1):
        return 0
    lo = 1  # fits
    hi = 2
    while hi <= cap and fits(hi):
        lo, hi = hi, hi * 2
    if hi > cap:
        if fits(cap):
            return cap
        hi = cap  # known not to fit
    while hi - lo > 1:  # invariant: fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


class _Peaks:
    """Device peak bytes of one model and plan as a function of b (or s), memoised across GPUs."""

    def __init__(self, card: ModelCard, plan: Plan, field: str) -> None:
        self.card, self.plan, self.field = card, plan, field
        self.seen: dict[int, int] = {}

    def __call__(self, n: int) -> int:
        if n not in self.seen:
            self.seen[n] = estimate(self.card, self.plan.with_(**{self.field: n})).peak_bytes
        return self.seen[n]

    def largest(self, memory_bytes: int, cap: int) -> int:
        return search_largest(lambda n: self(n) <= memory_bytes, cap)


def _card(model: str | ModelCard) -> ModelCard:
    return model if isinstance(model, ModelCard) else load_card(model)


def _usable_bytes(gpu) -> int:
    """Usable memory of a GPU card given by name or as a card."""
    if isinstance(gpu, str):
        from peftplan.planning.gpus import load_gpu

        gpu = load_gpu(gpu)
    return gpu.usable_memory_bytes


def seq_cap(card: ModelCard) -> int:
    """Sequences are searched up to the model's positions: beyond them the model cannot run (or was not trained)."""
    return card.max_positions


def largest_batch(card: str | ModelCard, plan: Plan, gpu, max_batch: int = MAX_BATCH) -> int:
    """The largest micro-batch b ≤ max_batch that fits `gpu` at plan.seq_len; 0 if b = 1 does not fit."""
    card = _card(card)
    return _Peaks(card, plan, "batch_size").largest(_usable_bytes(gpu), max_batch)


def longest_seq(card: str | ModelCard, plan: Plan, gpu, max_seq: int | None = None) -> int:
    """The longest sequence s ≤ max_seq (default: the model's positions) that fits `gpu` at plan.batch_size; 0 if
    s = 1 does not fit."""
    card = _card(card)
    cap = seq_cap(card) if max_seq is None else max_seq
    return _Peaks(card, plan, "seq_len").largest(_usable_bytes(gpu), cap)


# ---------------------------------------------------------------- the matrix


@dataclass(frozen=True)
class FitCell:
    """One model × GPU × method: what fits at the report's sequence length, and the longest sequence at b = 1."""

    model: str
    gpu: str
    method: str
    seq_len: int
    usable_memory_bytes: int
    peak_bytes_b1: int  # device peak at b = 1, s = seq_len
    largest_batch: int  # at seq_len; 0: not even b = 1 fits
    max_batch: int  # the search's cap: largest_batch == max_batch means "at least"
    longest_seq: int  # at b = 1; 0: not even s = 1 fits
    max_seq: int  # the search's cap (the model's positions)
    tokens_per_s: float = 0.0  # predicted at b = largest_batch, s = seq_len; 0 when nothing fits
    usd_per_million_tokens: float | None = None  # price of 10^6 tokens there; None when nothing fits

    @property
    def fits(self) -> bool:
        """Batch 1 at the requested sequence length fits."""
        return self.largest_batch > 0

    @property
    def batch_capped(self) -> bool:
        return self.largest_batch >= self.max_batch

    @property
    def seq_capped(self) -> bool:
        return self.longest_seq >= self.max_seq


@dataclass(frozen=True)
class FitMatrix:
    models: tuple[str, ...]
    gpus: tuple[str, ...]
    methods: tuple[str, ...]
    seq_len: int
    cells: tuple[FitCell, ...]  # models × methods × gpus, in that nesting order
    base: Plan | None = None  # the plan fields every cell shares (dtype, optimizer, checkpointing, ...)

    def cell(self, model: str, gpu: str, method: str) -> FitCell:
        i = (self.models.index(model) * len(self.methods) + self.methods.index(method)) * len(self.gpus)
        return self.cells[i + self.gpus.index(gpu)]

    def row(self, model: str, method: str) -> tuple[FitCell, ...]:
        return tuple(self.cell(model, g, method) for g in self.gpus)

    def by_cost(self, model: str, method: str) -> tuple[FitCell, ...]:
        """The cards that hold batch 1 at seq_len, cheapest per million tokens first."""
        cells = [c for c in self.row(model, method) if c.fits and c.usd_per_million_tokens is not None]
        return tuple(sorted(cells, key=lambda c: (c.usd_per_million_tokens, -c.tokens_per_s)))

    def fits_nowhere(self, model: str, method: str | None = None) -> bool:
        """No GPU holds batch 1 at seq_len, for this method (or for any method when None)."""
        methods = self.methods if method is None else (method,)
        return not any(c.fits for m in methods for c in self.row(model, m))

    def to_dict(self) -> dict:
        d = asdict(self)
        for cell, out in zip(self.cells, d["cells"]):
            out.update(fits=cell.fits, batch_capped=cell.batch_capped, seq_capped=cell.seq_capped)
        return d


def _method_cells(card: ModelCard, plan: Plan, gpus: Sequence, max_batch: int) -> list[FitCell]:
    by_batch = _Peaks(card, plan.with_(batch_size=1), "batch_size")
    by_seq = _Peaks(card, plan.with_(batch_size=1), "seq_len")
    cap = seq_cap(card)
    cells = []
    for g in gpus:
        mem = g.usable_memory_bytes
        b = by_batch.largest(mem, max_batch)
        tps, usd = _throughput(card, plan.with_(batch_size=b), g) if b else (0.0, None)
        cells.append(FitCell(
            model=card.name, gpu=g.name, method=plan.method, seq_len=plan.seq_len, usable_memory_bytes=mem,
            peak_bytes_b1=by_batch(1), largest_batch=b, max_batch=max_batch,
            longest_seq=by_seq.largest(mem, cap), max_seq=cap, tokens_per_s=tps, usd_per_million_tokens=usd,
        ))
    return cells


def _throughput(card: ModelCard, plan: Plan, gpu) -> tuple[float, float]:
    """(tokens/s, $ per 10^6 tokens) of the plan on a GPU card, from the roofline time."""
    t = estimate(card, plan, gpu=gpu.name, tokens=10**6).time
    return t.tokens_per_s, t.cost_usd


def fit_matrix(models: Sequence[str | ModelCard], gpus: Sequence, methods: Sequence[str], seq_len: int,
               base: Plan | None = None, max_batch: int = MAX_BATCH) -> FitMatrix:
    """Largest batch at `seq_len` and longest sequence at b = 1 for every model × GPU × method.

    `gpus` are names or GPU cards; `base` carries the other plan fields (rank, dtype, optimizer, ...).
    Raises PlanError for an unknown model, GPU or method; a model that fits nowhere is a row of zeros.
    """
    from peftplan.planning.gpus import load_gpu

    cards = [_card(m) for m in models]
    gpu_cards = [load_gpu(g) if isinstance(g, str) else g for g in gpus]
    base = base or Plan()
    plans = [base.with_method(m, seq_len=seq_len) for m in methods]  # validates methods and seq_len
    cells = [c for card in cards for plan in plans for c in _method_cells(card, plan, gpu_cards, max_batch)]
    return FitMatrix(base=base, models=tuple(c.name for c in cards), gpus=tuple(g.name for g in gpu_cards),
                     methods=tuple(p.method for p in plans), seq_len=seq_len, cells=tuple(cells))
