"""The measured-result schema: frozen dataclasses, JSON round-trip, atomic files under profiles/measured/.

One file per measured configuration, named `{model}__{gpu}__{date}__{config}.json`, so a grid that is
interrupted keeps every result it finished and a rerun of one configuration replaces only its own file.
`schema_version` changes when a field changes meaning or disappears; readers refuse newer versions and
ignore fields they do not know (added fields do not bump the version).

Every figure a later issue fits or checks is here with its unit in its name: per-phase torch peaks, the NVML
timeline with its baselines and spikes, the step timing, the environment, the estimate made at measuring
time (`predicted`, `Estimate.to_dict()`) and the comparison rows. `Settings.impl` and `Settings.tag` let a
grid add kinds of points (peft's layers, NVML off, throughput runs) without a new schema.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from peftplan.planning.cards import PROFILES
from peftplan.errors import PlanError
from peftplan.plan import Plan
from peftplan.profile.nvml import DEFAULT_INTERVAL_S, Mark, Spike

SCHEMA = "peftplan.measured"
SCHEMA_VERSION = 1
MEASURED_DIR = PROFILES / "measured"
STATUSES = ("ok", "does-not-fit", "error")
IMPLS = ("peftplan", "peft", "user")  # whose adapter layers were trained ("user": the user's own run, via the callback)


@dataclass(frozen=True)
class Settings:
    """How a configuration was measured (part of its identity, with the model and the plan)."""

    steps: int = 3  # measured steps, after the warm-up
    warmup: int = 1  # steps before measuring: the first builds optimizer states and warms the allocator
    interval_s: float = DEFAULT_INTERVAL_S  # NVML sampling interval
    nvml: bool = True  # sample NVML during the run (off: issue 8's overhead baseline)
    phase_sync: bool = True  # cuda.synchronize at phase boundaries: per-phase seconds, exact NVML attribution
    seed: int = 0
    impl: str = "peftplan"  # "peft": peft's LoRA on the same base (issue 8)
    tag: str = ""  # a grid's label for the point ("memory", "throughput", "nvml-overhead", ...)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise PlanError(f"steps must be at least 1, got {self.steps}")
        if self.warmup < 0:
            raise PlanError(f"warm-up steps cannot be negative, got {self.warmup}")
        if self.interval_s <= 0:
            raise PlanError(f"sampling interval must be positive, got {self.interval_s}")
        if self.impl not in IMPLS:
            raise PlanError(f"unknown implementation '{self.impl}' (choose from {', '.join(IMPLS)})")


@dataclass(frozen=True)
class PhaseMeasure:
    """One phase of the measured steps (maximum over them)."""

    phase: str  # forward | backward | optimizer
    peak_allocated_bytes: int  # torch.cuda.max_memory_allocated since the phase began
    peak_reserved_bytes: int  # torch.cuda.max_memory_reserved since the phase began
    start_allocated_bytes: int  # allocated when the phase began (last measured step)
    seconds: float  # median over the measured steps; 0 without phase_sync
    nvml_peak_bytes: int | None = None  # device bytes in use (NVML), highest within the phase


@dataclass(frozen=True)
class Timing:
    step_times_s: tuple[float, ...]  # each measured step, synchronize to synchronize
    step_time_s: float  # median
    tokens_per_step: int  # b·s
    tokens_per_s: float
    flops_per_step: float  # the estimate's count (peftplan.planning.timing), recompute included
    achieved_tflops: float
    peak_tflops: float | None  # the GPU card's dense peak for the plan's dtype (None: card unknown)
    utilisation: float | None  # achieved / peak


@dataclass(frozen=True)
class NvmlSummary:
    interval_s: float  # requested
    median_interval_s: float  # achieved
    n_samples: int
    idle_bytes: int  # device in use before this process created its CUDA context
    context_bytes: int  # ... after it did (CUDA context), before any model, less what torch had reserved
    start_bytes: int  # ... when this configuration started (context plus what torch kept)
    peak_bytes: int  # highest sample
    steady_peak_bytes: int  # highest level held for MIN_STEADY_S
    phase_peak_bytes: dict[str, int]  # highest sample within each phase of the measured steps
    spikes: tuple[Spike, ...]
    timeline: tuple[tuple[float, int], ...]  # (t_s, used_bytes) at every change of level
    marks: tuple[Mark, ...]
    error: str = ""


@dataclass(frozen=True)
class Failure:
    kind: str  # "oom" | "error"
    stage: str  # build | warmup | forward | backward | optimizer | ...
    step: int  # measured step index; -1 before the measured steps
    message: str  # first line of the exception
    allocated_bytes: int  # torch, just after the failure
    reserved_bytes: int
    peak_allocated_bytes: int  # torch's peak within the failing stage
    peak_reserved_bytes: int
    nvml_used_bytes: int | None  # last NVML sample
    requested_bytes: int | None  # "Tried to allocate ..." of a CUDA OOM, if it says


@dataclass(frozen=True)
class Environment:
    gpu_name: str
    gpu_memory_bytes: int
    gpu_card: str | None  # matched `peftplan gpus` card
    compute_capability: str
    driver_version: str
    cuda_version: str
    torch_version: str
    transformers_version: str
    bitsandbytes_version: str | None
    peft_version: str | None
    python_version: str
    peftplan_version: str
    simulated: bool = False  # measured by the CPU stand-in (--dry-run): not a measurement


@dataclass(frozen=True)
class CompareRow:
    """One figure, measured beside a reference (the estimate or the trace). Errors are signed:
    positive means the reference predicts more than was measured."""

    name: str  # e.g. "forward.peak_reserved", "weights", "trace.backward.peak_allocated"
    reference: str  # estimate | trace
    measured_bytes: int
    predicted_bytes: int
    error_bytes: int  # predicted − measured
    rel_error: float | None  # error / measured (None when nothing was measured)


@dataclass(frozen=True)
class ThroughputRow:
    measured_tokens_per_s: float
    predicted_tokens_per_s: float
    rel_error: float  # (predicted − measured) / measured
    measured_utilisation: float | None
    predicted_utilisation: float


@dataclass(frozen=True)
class StepMeasure:
    """One optimizer step of a user's own training run (the Trainer callback): what the device saw."""

    step: int  # the Trainer's global step
    batch_size: int  # sequences in the step's first micro-batch
    seq_len: int  # tokens per sequence in that micro-batch (padded length)
    seconds: float  # wall time of the step
    peak_allocated_bytes: int | None = None  # torch.cuda.max_memory_allocated within the step (None: no CUDA)
    peak_reserved_bytes: int | None = None
    nvml_bytes: int | None = None  # device memory in use at the step's end (NVML), when available


@dataclass(frozen=True)
class RankPeak:
    """One rank's own figures under torchrun (profile/ranks.py merges them into rank 0's result)."""

    rank: int
    status: str
    peak_allocated_bytes: int  # torch.cuda.max_memory_allocated on that rank, over the measured steps
    peak_reserved_bytes: int  # torch.cuda.max_memory_reserved
    device_name: str = ""


@dataclass(frozen=True)
class Measurement:
    model: str
    plan: Plan
    settings: Settings
    status: str  # ok | does-not-fit | error
    environment: Environment
    weights_allocated_bytes: int = 0  # after the model is built, before batch and optimizer
    step_start_allocated_bytes: int = 0  # at the start of the last measured step: weights + optimizer states
    phases: tuple[PhaseMeasure, ...] = ()
    timing: Timing | None = None
    nvml: NvmlSummary | None = None
    failure: Failure | None = None
    predicted: dict | None = None  # Estimate.to_dict() at measuring time
    traced: dict | None = None  # per-phase trace peaks, with --trace
    comparison: tuple[CompareRow, ...] = ()
    throughput: ThroughputRow | None = None
    card: dict = field(default_factory=dict)  # the ModelCard, so a renamed card still reproduces this
    warnings: tuple[str, ...] = ()
    steps: tuple[StepMeasure, ...] = ()  # per-step peaks of a user's run (Trainer callback); empty for profiles
    ranks: tuple[RankPeak, ...] = ()  # under torchrun: every rank's peaks (rank 0's figures are the rest)
    seconds: float = 0.0  # wall time spent on this configuration
    created_utc: str = ""
    schema: str = SCHEMA
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise PlanError(f"unknown status '{self.status}' (choose from {', '.join(STATUSES)})")

    @property
    def fits(self) -> bool:
        return self.status == "ok"

    @property
    def peak_allocated_bytes(self) -> int:
        return max((p.peak_allocated_bytes for p in self.phases), default=0)

    @property
    def peak_reserved_bytes(self) -> int:
        return max((p.peak_reserved_bytes for p in self.phases), default=0)

    @property
    def key(self) -> str:
        return config_key(self.model, self.plan, self.settings)

    def model_card(self):
        """The card measured (as recorded, so a later edit of the registry's card does not change it)."""
        from peftplan.planning.cards import ModelCard, load_card

        return ModelCard(**self.card) if self.card else load_card(self.model)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- dict <-> dataclass


def _convert(tp, value):
    """`value` (from JSON) as type `tp`: dataclasses, optionals, tuples and dicts, recursively."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(args[0], value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v) for v in value)
        return tuple(_convert(a, v) for a, v in zip(args, value))
    if origin is dict or tp is dict:
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def from_dict(cls, data: dict):
    """An instance of the dataclass `cls` from its `asdict` form; unknown keys (a newer writer) are ignored."""
    if not isinstance(data, dict):
        raise PlanError(f"expected an object for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    kwargs = {f.name: _convert(hints[f.name], data[f.name]) for f in dataclasses.fields(cls) if f.name in data}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise PlanError(f"{cls.__name__}: {e}") from None


def measurement_from_dict(data: dict) -> Measurement:
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise PlanError(f"not a {SCHEMA} record")
    version = data.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise PlanError(f"schema version {version} is newer than this peftplan reads ({SCHEMA_VERSION})")
    return from_dict(Measurement, data)


# ---------------------------------------------------------------- names


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "unknown"


def config_key(model: str, plan: Plan, settings: Settings) -> str:
    """Identity of a configuration across runs and days: model, plan, and the settings that change what is
    measured (not the step counts). A readable prefix and a hash of the rest."""
    ident = {"model": model, "plan": plan.to_dict(), "impl": settings.impl, "tag": settings.tag,
             "nvml": settings.nvml, "phase_sync": settings.phase_sync}
    digest = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:8]
    parts = [plan.method]
    if plan.uses_lora:
        parts.append(f"r{plan.r}")
    parts += [f"b{plan.batch_size}", f"s{plan.seq_len}", plan.dtype, plan.optimizer]
    if plan.grad_checkpointing:
        parts.append("ckpt")
    if settings.impl != "peftplan":
        parts.append(settings.impl)
    if settings.tag:
        parts.append(settings.tag)
    if not settings.nvml:
        parts.append("no-nvml")
    return slug("-".join(parts)) + "-" + digest


def gpu_slug(env: Environment) -> str:
    """The GPU in file names: its card, else its name; a simulated run says so (never mistaken for a real one)."""
    name = slug(env.gpu_card or env.gpu_name)
    return f"{name}-simulated" if env.simulated and "simulated" not in name else name


def file_name(m: Measurement) -> str:
    date = (m.created_utc or "0000-00-00")[:10]
    return f"{slug(m.model)}__{gpu_slug(m.environment)}__{date}__{m.key}.json"


# ---------------------------------------------------------------- files


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder and os.replace: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def to_json(m: Measurement) -> str:
    return json.dumps(m.to_dict(), indent=1, allow_nan=False) + "\n"


def save(m: Measurement, directory: Path | str = MEASURED_DIR) -> Path:
    path = Path(directory) / file_name(m)
    write_atomic(path, to_json(m))
    return path


def load(path: Path | str) -> Measurement:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PlanError(f"cannot read '{path}': {e}") from None
    try:
        return measurement_from_dict(data)
    except PlanError as e:
        raise PlanError(f"'{path}': {e}") from None


def load_dir(directory: Path | str = MEASURED_DIR) -> tuple[list[Measurement], list[str]]:
    """Every measurement under `directory` (recursively), and 'file: reason' for each file skipped."""
    found, skipped = [], []
    for path in sorted(Path(directory).rglob("*.json")):
        try:
            found.append(load(path))
        except PlanError as e:
            skipped.append(f"{path.name}: {e}")
    return found, skipped


def completed_keys(measurements: Iterable[Measurement], gpu: str | None = None) -> set[str]:
    """Keys of configurations already measured (on GPU `gpu` if given, by card or name slug), real ones only."""
    return {m.key for m in measurements
            if not m.environment.simulated and (gpu is None or gpu_slug(m.environment) == slug(gpu))}
