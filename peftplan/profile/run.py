"""Profile one configuration on the GPU: real steps of the shared training step, measured phase by phase.

The model is built from its card with random weights directly on the device (no download), then `warmup`
steps run (the first creates optimizer states and grows the allocator's pool) and `steps` steps are measured:

- torch's peak allocated and reserved bytes per phase: `reset_peak_memory_stats` at each `on_phase` boundary
  and the peaks read at the next (allocator statistics are host-side, in launch order: no sync needed);
- the NVML timeline (`nvml.NvmlSampler`) with a mark at every boundary, its baselines and spikes;
- step time between `cuda.synchronize()` calls, tokens/s, achieved TFLOP/s and utilisation of the GPU card.

Every torch.cuda call goes through a backend object (`CudaBackend` here, `fake.FakeCuda` on the CPU) so the
same code runs in the CPU tests and in `benchmarks/gpu_validate.py --dry-run`. An out-of-memory is a result
("does-not-fit", with the memory at failure), not an exception; so is any other failure of one configuration.
"""
from __future__ import annotations

import gc
import importlib
import json
import importlib.metadata
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone

from peftplan.planning.cards import ModelCard, load_card
from peftplan.errors import PlanError
from peftplan.plan import Plan
from peftplan.profile import compare
from peftplan.profile.nvml import (GpuUnavailable, NvmlSampler, change_points, detect_spikes, device_facts,
                                   device_handle, load_nvml, median_interval_s, peak_by_phase, steady_peak_bytes,
                                   used_bytes)
from peftplan.profile.store import (Environment, Failure, Measurement, NvmlSummary, PhaseMeasure, Settings,
                                    Timing)

PHASES = ("forward", "backward", "optimizer")
TRACE_HINT = "`peftplan trace` counts a step's memory on the CPU instead"


# ---------------------------------------------------------------- the device


class CudaBackend:
    """The torch.cuda calls the profiler makes, on one device."""

    simulated = False

    def __init__(self, index: int = 0) -> None:
        import torch

        self.torch, self.index, self.device = torch, index, f"cuda:{index}"

    def init(self) -> None:
        """Create the CUDA context (and nothing else), so NVML can see what it costs."""
        self.torch.cuda.set_device(self.index)
        self.torch.empty(1, device=self.device)
        self.synchronize()

    def synchronize(self) -> None:
        self.torch.cuda.synchronize(self.index)

    def empty_cache(self) -> None:
        self.torch.cuda.empty_cache()

    def reset_peak(self) -> None:
        self.torch.cuda.reset_peak_memory_stats(self.index)

    def stats(self) -> tuple[int, int, int, int]:
        """(allocated, reserved, peak allocated, peak reserved) bytes from one memory_stats call."""
        s = self.torch.cuda.memory_stats(self.index)
        return (s.get("allocated_bytes.all.current", 0), s.get("reserved_bytes.all.current", 0),
                s.get("allocated_bytes.all.peak", 0), s.get("reserved_bytes.all.peak", 0))

    def enter(self, stage: str) -> None:
        """Called at every stage and phase boundary; nothing to do on a real device."""

    def is_oom(self, exc: BaseException) -> bool:
        if isinstance(exc, self.torch.OutOfMemoryError):
            return True
        text = str(exc)  # bitsandbytes and cuBLAS report allocation failures as RuntimeErrors
        return "out of memory" in text.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in text

    def facts(self) -> dict:
        props = self.torch.cuda.get_device_properties(self.index)
        return {"name": props.name, "total_bytes": int(props.total_memory),
                "compute_capability": f"{props.major}.{props.minor}", "cuda_version": self.torch.version.cuda or "",
                "torch_version": self.torch.__version__}


def check_gpu(nvml=None, torch_module=None, need_nvml: bool = True) -> None:
    """GpuUnavailable naming everything missing (no CUDA device, NVML library not found), else None."""
    missing = []
    if need_nvml:
        try:
            load_nvml(nvml)
        except GpuUnavailable as e:
            missing.append(str(e))
    try:
        torch = torch_module or importlib.import_module("torch")
    except ImportError:
        missing.append("torch is not installed")
    else:
        if not torch.version.cuda:
            missing.append(f"no CUDA device (torch {torch.__version__} is a CPU-only build)")
        elif not torch.cuda.is_available():
            missing.append("no CUDA device visible to torch")
    if missing:
        raise GpuUnavailable(f"cannot profile here: {'; '.join(missing)}. {TRACE_HINT}")


# ---------------------------------------------------------------- the session


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _peftplan_version() -> str:
    from peftplan import __version__

    return __version__


_GPU_FAMILY = re.compile(r"^(?:[a-z]+\d+[a-z]*|\d{4}[a-z]*)$")  # h100, a100, l40s, rtx4090, 4090


def _words(name: str) -> list[str]:
    return [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w and w not in ("nvidia", "geforce", "tesla")]


def _tokens(name: str) -> set[str]:
    """Lower-case words of a GPU name, with adjacent pairs joined ('RTX 4090' also gives 'rtx4090')."""
    words = _words(name)
    return set(words) | {a + b for a, b in zip(words, words[1:])}


def match_gpu_card(device_name: str, total_bytes: int, cards: dict | None = None) -> str | None:
    """The `peftplan gpus` card for a device name such as 'NVIDIA H100 80GB HBM3', or None.

    The card's family word (h100, a100, rtx4090, ...) must appear in the device name and its memory must be
    within 10% of the device's; among those the most shared words win, then the closest memory. HBM3 on an
    H100 that says neither PCIe nor NVL is the SXM part.
    """
    if cards is None:
        try:
            from peftplan.planning.gpus import gpu_registry
        except ImportError:
            return None
        cards = gpu_registry()
    dev = _tokens(device_name)
    if "h100" in dev and "hbm3" in dev and not ({"nvl", "pcie"} & dev):
        dev.add("sxm")
    best, best_score = None, None
    for name, card in cards.items():
        toks = _tokens(name)
        family = {w for w in _words(name) if _GPU_FAMILY.match(w) and not w.endswith("gb")}
        if not family or not family <= dev:
            continue
        mem = getattr(card, "memory_bytes", 0) or getattr(card, "usable_memory_bytes", 0)
        gap = abs(mem - total_bytes) / total_bytes if mem and total_bytes else 0.0
        if gap > 0.10:
            continue
        score = (len(toks & dev), -gap)
        if best_score is None or score > best_score:
            best, best_score = name, score
    return best


@dataclass
class Session:
    """One process's hold on the device: the NVML handle and the baselines taken before any model."""

    backend: object
    nvml: object | None
    handle: object | None
    idle_bytes: int  # NVML, before this process's CUDA context
    context_bytes: int  # NVML, after it (less torch's first reserved block)
    environment: Environment


def open_session(backend=None, nvml=None, device_index: int = 0, use_nvml: bool = True) -> Session:
    """Take the NVML baselines around CUDA context creation. Call before anything touches the GPU."""
    handle, idle = None, 0
    facts_nvml: dict = {}
    if use_nvml:
        nvml = load_nvml(nvml)
        handle = device_handle(nvml, device_index)
        idle = int(statistics.median(used_bytes(nvml, handle) for _ in range(5)))
        facts_nvml = device_facts(nvml, handle)
    else:
        nvml = None
    backend = backend or CudaBackend(device_index)
    backend.init()
    # NVML after the context exists, less the block torch.empty(1) reserved: the context alone
    context = int(statistics.median(used_bytes(nvml, handle) for _ in range(5))) - backend.stats()[1] if nvml else 0
    f = backend.facts()
    total = f.get("total_bytes") or facts_nvml.get("total_bytes", 0)
    name = f.get("name") or facts_nvml.get("name", "")
    env = Environment(
        gpu_name=name, gpu_memory_bytes=int(total), gpu_card=match_gpu_card(name, int(total)),
        compute_capability=f.get("compute_capability", ""), driver_version=facts_nvml.get("driver_version", ""),
        cuda_version=f.get("cuda_version", ""), torch_version=f.get("torch_version", ""),
        transformers_version=_version("transformers") or "", bitsandbytes_version=_version("bitsandbytes"),
        peft_version=_version("peft"), python_version=platform.python_version(),
        peftplan_version=_peftplan_version(), simulated=bool(getattr(backend, "simulated", False)),
    )
    return Session(backend=backend, nvml=nvml, handle=handle, idle_bytes=idle, context_bytes=context,
                   environment=env)


def isolate(backend) -> None:
    """Free what the previous configuration left: collect cycles, return cached blocks, reset the peaks.

    After the collection every object left is live; `gc.freeze()` moves them out of the collector's sight,
    so the next collection scans only what the next configuration creates (0.1-0.3 s per point otherwise,
    with torch and transformers loaded). Frozen objects are still freed by reference counting.
    """
    gc.collect()
    gc.freeze()
    backend.empty_cache()
    backend.reset_peak()


# ---------------------------------------------------------------- the steps


def default_step_api():
    """The shared step (`build_model`, `make_batch`, `make_optimizer`, `train_step`)."""
    return importlib.import_module("peftplan.measure.step")


def peft_targets(targets: str | None):
    """Plan.targets in peft's terms: None (its defaults), 'all-linear', a list of names, or a regex string."""
    if targets is None or targets == "all-linear":
        return targets
    if targets.startswith("re:"):
        return targets[3:]
    return [t.strip() for t in targets.split(",") if t.strip()]


def build(api, card: ModelCard, plan: Plan, settings: Settings, device: str):
    """The model to train: ours (the step's injection), or peft's LoRA on the same frozen base."""
    if settings.impl == "peftplan":
        model, _ = api.build_model(card, plan, device, seed=settings.seed)
        return model
    if plan.method != "lora":
        raise PlanError(f"the peft comparison runs LoRA only, not '{plan.method}'")
    from peft import LoraConfig, get_peft_model

    base, _ = api.build_model(card, plan.with_(method="full"), device, seed=settings.seed)
    config = LoraConfig(r=plan.r, lora_alpha=plan.alpha, lora_dropout=plan.dropout,
                        target_modules=peft_targets(plan.targets))
    return get_peft_model(base, config)


class _Recorder:
    """The `on_phase` hook: closes the running phase (peaks, seconds) and opens the next.

    Only phases opened during a measured step (`step` ≥ 0) are recorded; `close()` ends the last one when the
    step function does not announce "end".
    """

    def __init__(self, backend, sampler, clock, sync: bool) -> None:
        self.backend, self.sampler, self.clock, self.sync = backend, sampler, clock, sync
        self.step = -1  # the step now running; -1 outside the measured steps
        self.stage = "build"
        self.opened_step = -1  # the step during which `stage` opened
        self.started = 0.0
        self.start_alloc = 0
        self.peaks: dict[str, tuple[int, int]] = {}  # phase -> (peak allocated, peak reserved), max over steps
        self.seconds: dict[str, list[float]] = {}
        self.starts: dict[str, int] = {}  # phase -> allocated when it opened (last measured step)
        self.step_start_alloc = 0

    def enter(self, stage: str) -> None:
        """A stage outside the step (build, ready, warmup)."""
        self.stage, self.opened_step = stage, -1
        self.backend.enter(stage)
        if self.sampler:
            self.sampler.mark(stage, -1)

    def _close(self, now: float, alloc_peak: int, reserved_peak: int) -> None:
        if self.stage in PHASES and self.opened_step >= 0:
            old = self.peaks.get(self.stage, (0, 0))
            self.peaks[self.stage] = (max(old[0], alloc_peak), max(old[1], reserved_peak))
            self.seconds.setdefault(self.stage, []).append(now - self.started)
            self.starts[self.stage] = self.start_alloc

    def __call__(self, name: str) -> None:
        if self.sync:
            self.backend.synchronize()
        now = self.clock()
        alloc, _, peak_alloc, peak_res = self.backend.stats()
        self._close(now, peak_alloc, peak_res)
        if name == "forward" and self.step >= 0:
            self.step_start_alloc = alloc
        self.stage, self.opened_step, self.started, self.start_alloc = name, self.step, now, alloc
        self.backend.reset_peak()
        self.backend.enter(name)
        if self.sampler:
            self.sampler.mark(name, self.step)

    def close(self) -> None:
        """End the running phase unless the step already said "end"."""
        if self.stage in PHASES:
            self("end")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")[:300]


def _requested_bytes(message: str) -> int | None:
    m = re.search(r"Tried to allocate ([\d.]+) (B|KiB|MiB|GiB|TiB)", message)
    if not m:
        return None
    return int(float(m.group(1)) * 1024 ** ("B", "KiB", "MiB", "GiB", "TiB").index(m.group(2)))


def _failure(backend, rec: _Recorder, sampler, exc: BaseException, oom: bool) -> Failure:
    try:
        alloc, res, peak_alloc, peak_res = backend.stats()
    except Exception:  # noqa: BLE001 - a broken device still gets its failure recorded
        alloc = res = peak_alloc = peak_res = 0
    return Failure(kind="oom" if oom else "error", stage=rec.stage, step=rec.step, message=_first_line(exc),
                   allocated_bytes=alloc, reserved_bytes=res, peak_allocated_bytes=peak_alloc,
                   peak_reserved_bytes=peak_res, nvml_used_bytes=sampler.last_bytes if sampler else None,
                   requested_bytes=_requested_bytes(str(exc)))


# ---------------------------------------------------------------- derived figures


def timing(card: ModelCard, plan: Plan, step_times_s: list[float], gpu_card: str | None) -> Timing:
    from peftplan.planning.params import count
    from peftplan.planning.timing import flops_per_token

    median = statistics.median(step_times_s)
    flops = flops_per_token(card, plan, count(card, plan)) * plan.tokens
    achieved = flops / median / 1e12 if median > 0 else 0.0
    peak = None
    if gpu_card:
        try:
            from peftplan.planning.gpus import load_gpu, peak_tflops

            peak = float(peak_tflops(load_gpu(gpu_card), plan.dtype))
        except (ImportError, PlanError):
            peak = None
    return Timing(step_times_s=tuple(step_times_s), step_time_s=median, tokens_per_step=plan.tokens,
                  tokens_per_s=plan.tokens / median if median > 0 else 0.0, flops_per_step=flops,
                  achieved_tflops=achieved, peak_tflops=peak, utilisation=achieved / peak if peak else None)


def nvml_summary(session: Session, timeline, settings: Settings) -> NvmlSummary:
    samples = timeline.samples
    steps = [m for m in timeline.marks if m.step >= 0 and m.label in PHASES]
    return NvmlSummary(
        interval_s=settings.interval_s, median_interval_s=median_interval_s(samples), n_samples=len(samples),
        idle_bytes=session.idle_bytes, context_bytes=session.context_bytes, start_bytes=timeline.baseline_bytes,
        peak_bytes=max((v for _, v in samples), default=0), steady_peak_bytes=steady_peak_bytes(samples),
        phase_peak_bytes={k: v for k, v in peak_by_phase(samples, timeline.marks).items() if k in PHASES}
        if steps else {},
        spikes=detect_spikes(samples, timeline.marks), timeline=change_points(samples), marks=timeline.marks,
        error=timeline.error)


def _plain(d: dict) -> dict:
    """As JSON will read it back (tuples become lists), so a saved result equals the one in memory."""
    return json.loads(json.dumps(d))


def predict(card: ModelCard, plan: Plan, gpu_card: str | None) -> tuple[dict | None, list[str]]:
    """The estimate at measuring time (with the GPU card's time model when the card is known)."""
    from peftplan.planning import estimate

    try:
        return _plain(estimate(card, plan, gpu=gpu_card).to_dict()), []
    except (PlanError, ImportError) as e:
        if gpu_card is None:
            return None, [f"no estimate: {e}"]
    try:
        return _plain(estimate(card, plan).to_dict()), [f"estimate without the GPU card '{gpu_card}'"]
    except PlanError as e:
        return None, [f"no estimate: {e}"]


def trace_peaks(card: ModelCard, plan: Plan) -> dict[str, int]:
    """Peak tensor bytes per phase from the fake-tensor trace (`peftplan trace`)."""
    from peftplan.trace.run import trace

    return {p.phase: int(p.peak_bytes) for p in trace(card, plan).phases}


# ---------------------------------------------------------------- one configuration


def profile_point(session: Session, model: str | ModelCard, plan: Plan, settings: Settings = Settings(), *,
                  step_api=None, with_trace: bool = False, clock: Callable[[], float] = time.perf_counter,
                  ) -> Measurement:
    """Measure one configuration. Failures (out of memory included) come back as the Measurement's status."""
    card = model if isinstance(model, ModelCard) else load_card(model)
    api = step_api or default_step_api()
    backend = session.backend
    sampler = None
    if settings.nvml and session.nvml is not None:
        sampler = NvmlSampler(session.nvml, session.handle, settings.interval_s, clock=clock)
    rec = _Recorder(backend, sampler, clock, settings.phase_sync)
    t0 = clock()
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    failure, weights, step_times = None, 0, []
    model_ = batch = optimizer = None
    isolate(backend)
    if sampler:
        sampler.start()
    try:
        rec.enter("build")
        model_ = build(api, card, plan, settings, backend.device)
        backend.synchronize()
        rec.enter("ready")
        weights = backend.stats()[0]
        batch = api.make_batch(card, plan, backend.device)
        optimizer = api.make_optimizer(model_, plan)
        for _ in range(settings.warmup):
            rec.enter("warmup")
            api.train_step(model_, batch, optimizer, plan, on_phase=rec)
            rec.close()
        for i in range(settings.steps):
            rec.step = i
            backend.synchronize()
            start = clock()
            api.train_step(model_, batch, optimizer, plan, on_phase=rec)
            backend.synchronize()
            step_times.append(clock() - start)
            rec.close()
    except Exception as e:  # noqa: BLE001 - one configuration's failure is its result; the grid goes on
        failure = _failure(backend, rec, sampler, e, backend.is_oom(e))
    finally:
        timeline = sampler.stop() if sampler else None
        model_ = batch = optimizer = None  # drop the configuration before the next one is built
    status = "ok" if failure is None else ("does-not-fit" if failure.kind == "oom" else "error")
    phases = tuple(
        PhaseMeasure(phase=p, peak_allocated_bytes=rec.peaks[p][0], peak_reserved_bytes=rec.peaks[p][1],
                     start_allocated_bytes=rec.starts.get(p, 0),
                     seconds=statistics.median(rec.seconds[p]) if settings.phase_sync else 0.0)
        for p in PHASES if p in rec.peaks and failure is None
    )
    nvml = nvml_summary(session, timeline, settings) if timeline is not None else None
    if nvml is not None:
        phases = tuple(replace(p, nvml_peak_bytes=nvml.phase_peak_bytes.get(p.phase)) for p in phases)
    env = session.environment
    predicted, warnings = predict(card, plan, env.gpu_card)
    m = Measurement(
        model=card.name, plan=plan, settings=settings, status=status, environment=env,
        weights_allocated_bytes=weights, step_start_allocated_bytes=rec.step_start_alloc, phases=phases,
        timing=timing(card, plan, step_times, env.gpu_card) if failure is None else None, nvml=nvml,
        failure=failure, predicted=predicted, card=_plain(card.to_dict()), warnings=tuple(warnings),
        seconds=clock() - t0, created_utc=created,
    )
    rows = compare.memory_rows(m)
    traced = None
    if with_trace and status == "ok":
        try:
            traced = trace_peaks(card, plan)
            rows += compare.trace_rows(m, traced)
        except ImportError:
            m = replace(m, warnings=m.warnings + ("the tracer is not available",))
        except PlanError as e:
            m = replace(m, warnings=m.warnings + (f"trace failed: {e}",))
    return replace(m, comparison=rows, traced=traced, throughput=compare.throughput_row(m))
