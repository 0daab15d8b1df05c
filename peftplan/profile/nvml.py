"""Device memory as NVML sees it, sampled by a background thread, and the spikes in that timeline.

NVML reports what the whole device has in use: torch's reserved pool, the CUDA context and kernel images,
cuBLAS/cuDNN workspaces and anything allocated outside torch (bitsandbytes paged buffers, NCCL). It is the
figure that decides an out-of-memory, and the only one that shows excursions the caching allocator never
sees. The sampler takes an NVML module as an argument (`pynvml` by default) so CPU tests drive it with a
stand-in; the analysis below is pure and works on any (t_s, used_bytes) series.

Spikes: the *steady peak* is the highest level the device holds for at least `min_steady_s`; a spike is a
run of samples above it by more than a threshold. By construction a spike is shorter than `min_steady_s`.
"""
from __future__ import annotations

import bisect
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from peftplan.errors import PlanError

DEFAULT_INTERVAL_S = 0.005  # 200 Hz: one ctypes call each (it releases the GIL); see issue 8 for its cost
MIN_STEADY_S = 0.05  # a level held this long is steady; shorter excursions above it are spikes
MIN_SPIKE_BYTES = 16 * 2**20  # below this an excursion is allocator noise, not a spike
MIN_SPIKE_FRACTION = 0.005  # ... or below this share of the steady peak

Sample = tuple[float, int]  # (seconds since the sampler started, device bytes in use)


class GpuUnavailable(PlanError):
    """What the GPU profiler needs is missing: the message names it in one line."""


@dataclass(frozen=True)
class Mark:
    """A boundary set by the profiled code: a phase of a step ("forward", ...) or a stage ("build", ...)."""

    t_s: float
    label: str
    step: int = -1  # measured step index; -1 outside the measured steps (build, warm-up)


@dataclass(frozen=True)
class Timeline:
    interval_s: float  # requested sampling interval
    baseline_bytes: int  # in use when the sampler started (before the configuration's model)
    samples: tuple[Sample, ...]
    marks: tuple[Mark, ...]
    error: str = ""  # why sampling stopped early, if it did


@dataclass(frozen=True)
class Spike:
    t_s: float  # first sample above the threshold
    duration_s: float  # until the first sample back below it
    peak_bytes: int
    excess_bytes: int  # peak − steady peak
    phase: str  # label of the last mark before the spike ("" if none)
    step: int
    phase_offset_s: float  # seconds after that mark


# ---------------------------------------------------------------- the NVML library


def load_nvml(nvml=None):
    """The initialised NVML module (`pynvml` unless one is given); GpuUnavailable if it cannot load."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            raise GpuUnavailable("nvidia-ml-py is not installed (pip install nvidia-ml-py)") from None
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as e:
        lib_missing = getattr(nvml, "NVMLError_LibraryNotFound", ())
        if lib_missing and isinstance(e, lib_missing):
            raise GpuUnavailable("NVML library not found (no NVIDIA driver on this machine)") from None
        raise GpuUnavailable(f"NVML failed to initialise: {e}") from None
    return nvml


def device_handle(nvml, index: int = 0):
    try:
        return nvml.nvmlDeviceGetHandleByIndex(index)
    except nvml.NVMLError as e:
        raise GpuUnavailable(f"NVML sees no GPU {index}: {e}") from None


def used_bytes(nvml, handle) -> int:
    return int(nvml.nvmlDeviceGetMemoryInfo(handle).used)


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def device_facts(nvml, handle) -> dict:
    """Name, total memory and driver version as NVML reports them ('' where it cannot)."""
    facts = {"name": "", "total_bytes": 0, "driver_version": ""}
    for key, call in (("name", lambda: _text(nvml.nvmlDeviceGetName(handle))),
                      ("total_bytes", lambda: int(nvml.nvmlDeviceGetMemoryInfo(handle).total)),
                      ("driver_version", lambda: _text(nvml.nvmlSystemGetDriverVersion()))):
        try:
            facts[key] = call()
        except Exception:  # noqa: BLE001 - a fact NVML lacks is recorded as unknown, not fatal
            pass
    return facts


# ---------------------------------------------------------------- the sampler


class NvmlSampler:
    """Samples device memory in use every `interval_s` on a daemon thread until `stop()`.

    `mark(label, step)` records a boundary on the same clock; `stop()` returns the `Timeline`.
    """

    def __init__(self, nvml, handle, interval_s: float = DEFAULT_INTERVAL_S,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if interval_s <= 0:
            raise PlanError(f"sampling interval must be positive, got {interval_s}")
        self.nvml, self.handle, self.interval_s, self.clock = nvml, handle, interval_s, clock
        self._samples: list[Sample] = []
        self._marks: list[Mark] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._baseline = 0
        self._error = ""

    def read(self) -> int:
        return used_bytes(self.nvml, self.handle)

    @property
    def last_bytes(self) -> int | None:
        return self._samples[-1][1] if self._samples else None

    def start(self) -> "NvmlSampler":
        self._t0 = self.clock()
        self._baseline = self.read()
        self._samples.append((0.0, self._baseline))
        self._thread = threading.Thread(target=self._run, name="peftplan-nvml", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        next_t = self.clock() + self.interval_s
        while not self._stop.wait(max(0.0, next_t - self.clock())):
            try:
                used = self.read()
            except Exception as e:  # noqa: BLE001 - keep what was sampled; say why it ended
                self._error = f"{type(e).__name__}: {e}"
                return
            now = self.clock()
            self._samples.append((now - self._t0, used))  # list.append is atomic under the GIL
            next_t += self.interval_s
            if next_t < now:  # fell behind (GIL held elsewhere): resume the grid from now
                next_t = now + self.interval_s

    def mark(self, label: str, step: int = -1) -> None:
        self._marks.append(Mark(self.clock() - self._t0, label, step))

    def stop(self) -> Timeline:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:  # close the series at the stop time so the last level has a duration
            self._samples.append((self.clock() - self._t0, self.read()))
        except Exception as e:  # noqa: BLE001
            self._error = self._error or f"{type(e).__name__}: {e}"
        return Timeline(interval_s=self.interval_s, baseline_bytes=self._baseline,
                        samples=tuple(self._samples), marks=tuple(self._marks), error=self._error)

    def __enter__(self) -> "NvmlSampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        if not self._stop.is_set():
            self.stop()


# ---------------------------------------------------------------- analysis (pure)


def change_points(samples: Sequence[Sample]) -> tuple[Sample, ...]:
    """The samples where the level changes, plus the first and last: the same step function, far shorter."""
    out: list[Sample] = []
    for i, (t, v) in enumerate(samples):
        if not out or v != out[-1][1] or i == len(samples) - 1:
            out.append((t, v))
    return tuple(out)


def median_interval_s(samples: Sequence[Sample]) -> float:
    gaps = [b[0] - a[0] for a, b in zip(samples, samples[1:])]
    return statistics.median(gaps) if gaps else 0.0


def steady_peak_bytes(samples: Sequence[Sample], min_steady_s: float = MIN_STEADY_S) -> int:
    """The highest level held for at least `min_steady_s` (the series is a step function: each value holds
    until the next sample). The best window starts at a sample, so a sliding minimum over windows
    [t_i, t_i + min_steady_s] that end inside the series finds it in one pass. A series shorter than one
    window has no steady level but its minimum."""
    if not samples:
        return 0
    t_end = samples[-1][0]
    best = None
    window: deque[int] = deque()  # indices with increasing values: the front is the window's minimum
    j = 0
    for i, (t, _) in enumerate(samples):
        if t + min_steady_s > t_end:
            break
        while j < len(samples) and samples[j][0] <= t + min_steady_s:
            while window and samples[window[-1]][1] >= samples[j][1]:
                window.pop()
            window.append(j)
            j += 1
        while window[0] < i:
            window.popleft()
        level = samples[window[0]][1]
        best = level if best is None else max(best, level)
    return best if best is not None else min(v for _, v in samples)


def mark_at(marks: Sequence[Mark], t_s: float) -> Mark | None:
    """The last mark at or before t_s."""
    found = None
    for m in marks:
        if m.t_s <= t_s:
            found = m
        else:
            break
    return found


def detect_spikes(samples: Sequence[Sample], marks: Sequence[Mark] = (), min_steady_s: float = MIN_STEADY_S,
                  min_excess_bytes: int = MIN_SPIKE_BYTES, min_excess_fraction: float = MIN_SPIKE_FRACTION,
                  ) -> tuple[Spike, ...]:
    """Runs of samples above steady peak + max(min_excess_bytes, min_excess_fraction · steady peak)."""
    steady = steady_peak_bytes(samples, min_steady_s)
    threshold = steady + max(min_excess_bytes, int(min_excess_fraction * steady))
    marks = sorted(marks, key=lambda m: m.t_s)
    spikes: list[Spike] = []
    run: list[Sample] = []
    for k, (t, v) in enumerate([*samples, (float("inf"), -1)]):  # a sentinel closes a trailing run
        if v > threshold:
            run.append((t, v))
            continue
        if run:
            start = run[0][0]
            end = t if t != float("inf") else run[-1][0]
            peak = max(b for _, b in run)
            m = mark_at(marks, start)
            spikes.append(Spike(t_s=start, duration_s=end - start, peak_bytes=peak, excess_bytes=peak - steady,
                                phase=m.label if m else "", step=m.step if m else -1,
                                phase_offset_s=start - m.t_s if m else start))
            run = []
    return tuple(spikes)


def peak_by_phase(samples: Sequence[Sample], marks: Sequence[Mark], steps_only: bool = True) -> dict[str, int]:
    """Highest sample within each mark's span, by label (over measured steps only, by default).

    A span runs from its mark to the next one; the sample in force at the mark (the level carried in)
    counts too, since the device holds it during the phase.
    """
    marks = sorted(marks, key=lambda m: m.t_s)
    times = [t for t, _ in samples]
    out: dict[str, int] = {}
    for m, nxt in zip(marks, [*marks[1:], None]):
        if steps_only and m.step < 0:
            continue
        first = max(0, bisect.bisect_right(times, m.t_s) - 1)  # the level carried into the span
        last = bisect.bisect_left(times, nxt.t_s) if nxt is not None else len(times)
        values = [v for _, v in samples[first:max(last, first + 1)]]
        if values:
            out[m.label] = max(out.get(m.label, 0), max(values))
    return out
