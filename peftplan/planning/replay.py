"""Replay a traced step's allocation/free events through the caching-allocator model: the reserved peak.

The events come from the fake-tensor trace (`peftplan.trace.counter.LiveBytes.events`): tuples
(action "a" | "f", storage key, bytes requested, stream, phase, op, module, step). Pure Python, no torch:
the events are plain data. Three figures per phase, as torch names them:
    live      Σ requests rounded to 512 B: the trace's count (what the estimate models)
    allocated Σ sizes of the blocks handed out (`max_memory_allocated`: an unsplit block counts whole)
    reserved  Σ segments cudaMalloc'd (`max_memory_reserved`): what the device must hold
"""
from __future__ import annotations

import random
import time
from collections.abc import Iterable
from dataclasses import dataclass

from peftplan.errors import PlanError
from peftplan.planning.allocator import AllocatorConfig, CachingAllocator, OutOfMemory, SegmentInfo, round_size


@dataclass(frozen=True)
class PhaseReserved:
    step: int
    phase: str
    peak_live_bytes: int
    peak_allocated_bytes: int
    peak_reserved_bytes: int  # the most reserved at any moment of this phase


@dataclass(frozen=True)
class PeakState:
    """The allocator at the moment reserved reached its maximum."""

    event_index: int
    step: int
    phase: str
    op: str
    module: str
    live_bytes: int
    allocated_bytes: int
    reserved_bytes: int
    largest_free_block_bytes: int  # the largest cached block: the biggest request served without cudaMalloc
    segments: int

    @property
    def fragmentation(self) -> float:
        """Share of reserved bytes not allocated: (reserved − allocated) / reserved."""
        return 1 - self.allocated_bytes / self.reserved_bytes if self.reserved_bytes else 0.0


@dataclass(frozen=True)
class Replay:
    config: AllocatorConfig
    allocations: int  # alloc events replayed (zero-byte storages are never allocated by torch)
    frees: int
    peak_live_bytes: int
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    phases: tuple[PhaseReserved, ...]  # per (step, phase), in event order
    peak: PeakState
    segments: tuple[SegmentInfo, ...]  # the layout after the last event
    seq_lens: tuple[int, ...]  # per step, when given
    oom: str  # "" when every request was served
    seconds: float

    @property
    def reserved_per_step(self) -> tuple[int, ...]:
        """Max reserved by the end of each step: how reserved grows across steps."""
        out: dict[int, int] = {}
        for p in self.phases:
            out[p.step] = max(out.get(p.step, 0), p.peak_reserved_bytes)
        running, seq = 0, []
        for step in sorted(out):
            running = max(running, out[step])
            seq.append(running)
        return tuple(seq)

    def phase_peak(self, phase: str, step: int | None = None) -> PhaseReserved:
        """The (last step's, or `step`'s) figures for `phase`. Raises PlanError if the phase never ran."""
        rows = [p for p in self.phases if p.phase == phase and (step is None or p.step == step)]
        if not rows:
            raise PlanError(f"no phase '{phase}' in the replay")
        return rows[-1]


def replay(events: Iterable[tuple], config: AllocatorConfig | None = None,
           seq_lens: tuple[int, ...] = ()) -> Replay:
    """Run the events through a fresh `CachingAllocator`; stop at the first out-of-memory (`Replay.oom`).

    A free of a storage that was never allocated (a zero-byte storage) is skipped. Raises PlanError on a
    malformed event.
    """
    config = config or AllocatorConfig()
    t0 = time.perf_counter()
    alloc = CachingAllocator(config)
    stats = alloc.stats
    live_of: dict[int, tuple[int, int]] = {}  # storage key -> (block address, rounded bytes)
    divisions = config.roundup_power2_divisions
    live = peak_live = n_alloc = n_free = 0
    rows: dict[tuple[int, str], list[int]] = {}
    peak = None
    oom = ""
    row = None
    current = (None, None)
    for i, ev in enumerate(events):
        try:
            action, key, nbytes, stream, phase, op, module, step = ev
        except (TypeError, ValueError):
            raise PlanError(f"event {i} is not (action, key, bytes, stream, phase, op, module, step): {ev!r}") from None
        if (step, phase) != current:
            current = (step, phase)
            row = rows.setdefault(current, [live, stats.allocated_bytes, stats.reserved_bytes])
        if action == "a":
            if nbytes <= 0 or key in live_of:
                continue
            try:
                addr = alloc.malloc(nbytes, stream)
            except OutOfMemory as e:
                oom = f"step {step} {phase} at {op} in {module or '-'}: {e}"
                break
            r = round_size(nbytes, divisions)
            live_of[key] = (addr, r)
            live += r
            n_alloc += 1
            peak_live = max(peak_live, live)
            if live > row[0]:
                row[0] = live
            if stats.allocated_bytes > row[1]:
                row[1] = stats.allocated_bytes
            if stats.reserved_bytes > row[2]:
                row[2] = stats.reserved_bytes
            if peak is None or stats.reserved_bytes > peak.reserved_bytes:
                peak = PeakState(i, step, phase, op, module, live, stats.allocated_bytes, stats.reserved_bytes,
                                 alloc.largest_free_block(), stats.segments)
        elif action == "f":
            got = live_of.pop(key, None)
            if got is None:
                continue
            alloc.free(got[0])
            live -= got[1]
            n_free += 1
        else:
            raise PlanError(f"event {i}: unknown action {action!r}")
    if peak is None:
        raise PlanError("no allocation to replay")
    phases = tuple(PhaseReserved(s, ph, v[0], v[1], v[2]) for (s, ph), v in rows.items())
    return Replay(config=config, allocations=n_alloc, frees=n_free, peak_live_bytes=peak_live,
                  peak_allocated_bytes=stats.peak_allocated_bytes, peak_reserved_bytes=stats.peak_reserved_bytes,
                  phases=phases, peak=peak, segments=tuple(alloc.snapshot()), seq_lens=tuple(seq_lens),
                  oom=oom, seconds=time.perf_counter() - t0)


def lengths_from_percentiles(spec: dict[float, int], steps: int, seed: int = 0) -> tuple[int, ...]:
    """`steps` sequence lengths drawn from a distribution given by percentiles ({50: 512, 90: 1800, 100: 2048}).

    Inverse-CDF sampling with linear interpolation between the given points (the 0th percentile defaults to
    the smallest length given); a fixed seed makes the draw reproducible. Raises PlanError on an empty spec,
    a percentile outside [0, 100], or lengths that decrease with the percentile.
    """
    if not spec or steps < 1:
        raise PlanError("give at least one percentile:length pair and one step")
    pts = sorted((float(p), int(v)) for p, v in spec.items())
    if pts[0][0] < 0 or pts[-1][0] > 100:
        raise PlanError("percentiles must be within 0..100")
    if any(b[1] < a[1] for a, b in zip(pts, pts[1:])):
        raise PlanError("lengths must not decrease as the percentile grows")
    if pts[0][0] > 0:
        pts.insert(0, (0.0, pts[0][1]))
    if pts[-1][0] < 100:
        pts.append((100.0, pts[-1][1]))
    rng = random.Random(seed)
    out = []
    for _ in range(steps):
        q = rng.uniform(0, 100)
        for (p0, v0), (p1, v1) in zip(pts, pts[1:]):
            if q <= p1:
                out.append(max(1, round(v0 + (v1 - v0) * ((q - p0) / (p1 - p0) if p1 > p0 else 1.0))))
                break
    return tuple(out)
