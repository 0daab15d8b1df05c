"""Measured results under `profiles/measured/`, read defensively for the predicted-vs-measured section.

The profiler (`peftplan.profile.store`) writes one `peftplan.measured` JSON file per configuration. This reader
takes only the fields the report draws, with a type check on each, so a file of another schema version, a
half-edited file or a failed run never breaks a report: what cannot be read is listed as skipped, with why.

    model, plan, status, environment.{gpu_card, gpu_name, simulated}
    comparison[]            {name, reference, measured_bytes, predicted_bytes}: memory figures beside the estimate
    throughput              {measured_tokens_per_s, predicted_tokens_per_s}
    nvml.timeline           [[t_s, used_bytes], ...];  nvml.spikes [{t_s, peak_bytes, phase}, ...]
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from peftplan.errors import PlanError

from peftplan.planning.cards import PROFILES

MEASURED_DIR = PROFILES / "measured"
SCHEMA, SCHEMA_VERSION = "peftplan.measured", 1
MAX_TIMELINES = 12  # a grid of hundreds of runs keeps the page readable (and small)
MAX_TIMELINE_POINTS = 3000  # longer timelines are thinned, keeping each bucket's maximum
HEADLINE = ("peak.reserved", "peak.allocated", "peak.device")  # drawn by default; other figures on demand


@dataclass(frozen=True)
class MeasuredPoint:
    source: str  # file name
    model: str
    gpu: str
    label: str  # the plan, briefly
    metric: str  # e.g. "peak.reserved", "trace.peak.allocated", "tokens/s"
    unit: str  # "bytes" | "tokens/s"
    predicted: float
    measured: float

    @property
    def error_percent(self) -> float:
        """Signed: positive when the prediction is higher than the measurement."""
        return 100.0 * (self.predicted - self.measured) / self.measured


@dataclass(frozen=True)
class FailedRun:
    source: str
    model: str
    gpu: str
    label: str
    status: str  # does-not-fit | error
    detail: str


@dataclass(frozen=True)
class Timeline:
    source: str
    model: str
    gpu: str
    label: str
    t_s: tuple[float, ...]
    used_bytes: tuple[int, ...]
    steady_peak_bytes: int | None
    spike_t_s: tuple[float, ...]
    spike_bytes: tuple[int, ...]
    spike_phases: tuple[str, ...]


@dataclass(frozen=True)
class Measured:
    directory: str
    files: int  # JSON files found
    points: tuple[MeasuredPoint, ...]
    failed: tuple[FailedRun, ...]
    timelines: tuple[Timeline, ...]
    skipped: tuple[str, ...]  # "file: reason"
    other_models: int  # readable results of models not in the report

    @classmethod
    def empty(cls, directory: str = "") -> "Measured":
        return cls(directory=directory, files=0, points=(), failed=(), timelines=(), skipped=(), other_models=0)


# ---------------------------------------------------------------- field readers


def _num(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _dict(v) -> dict:
    return v if isinstance(v, dict) else {}


def _list(v) -> list:
    return v if isinstance(v, list) else []


def gpu_of(doc: dict) -> str:
    env = _dict(doc.get("environment"))
    name = env.get("gpu_card") or env.get("gpu_name") or "?"
    return f"{name} (simulated)" if env.get("simulated") else str(name)


def label_of(plan: dict) -> str:
    parts = [str(plan.get("method", "?"))]
    if plan.get("method") in ("lora", "qlora") and "r" in plan:
        parts.append(f"r={plan['r']}")
    parts += [f"{k}={plan[f]}" for k, f in (("b", "batch_size"), ("s", "seq_len")) if f in plan]
    if plan.get("grad_checkpointing"):
        parts.append("ckpt")
    return " ".join(parts)


def points_of(doc: dict, source: str, gpu: str, label: str) -> list[MeasuredPoint]:
    model, out = doc["model"], []
    for row in _list(doc.get("comparison")):
        row = _dict(row)
        m, p, name = _num(row.get("measured_bytes")), _num(row.get("predicted_bytes")), row.get("name")
        if m and m > 0 and p is not None and isinstance(name, str):
            metric = name if row.get("reference", "estimate") == "estimate" or name.startswith("trace.") \
                else f"{row['reference']}.{name}"
            out.append(MeasuredPoint(source, model, gpu, label, metric, "bytes", p, m))
    t = _dict(doc.get("throughput"))
    m, p = _num(t.get("measured_tokens_per_s")), _num(t.get("predicted_tokens_per_s"))
    if m and m > 0 and p is not None:
        out.append(MeasuredPoint(source, model, gpu, label, "tokens/s", "tokens/s", p, m))
    return out


def _pairs(v) -> list[tuple[float, int]]:
    out = []
    for item in _list(v):
        if isinstance(item, (list, tuple)) and len(item) >= 2:
            t, b = _num(item[0]), _num(item[1])
            if t is not None and b is not None:
                out.append((t, int(b)))
    return out


def thin(points: list[tuple[float, int]], n: int = MAX_TIMELINE_POINTS) -> list[tuple[float, int]]:
    """At most about n points, keeping each bucket's maximum so that no spike disappears."""
    if len(points) <= n:
        return points
    step = math.ceil(len(points) / n)
    return [max(points[i:i + step], key=lambda p: p[1]) for i in range(0, len(points), step)]


def timeline_of(doc: dict, source: str, gpu: str, label: str) -> Timeline | None:
    nvml = _dict(doc.get("nvml"))
    points = thin(_pairs(nvml.get("timeline")))
    if not points:
        return None
    spikes = [s for s in map(_dict, _list(nvml.get("spikes")))
              if _num(s.get("t_s")) is not None and _num(s.get("peak_bytes")) is not None]
    steady = _num(nvml.get("steady_peak_bytes"))
    return Timeline(source=source, model=doc["model"], gpu=gpu, label=label, t_s=tuple(p[0] for p in points),
                    used_bytes=tuple(p[1] for p in points), steady_peak_bytes=int(steady) if steady else None,
                    spike_t_s=tuple(float(s["t_s"]) for s in spikes),
                    spike_bytes=tuple(int(s["peak_bytes"]) for s in spikes),
                    spike_phases=tuple(str(s.get("phase", "")) for s in spikes))


def failure_of(doc: dict, source: str, gpu: str, label: str) -> FailedRun:
    f = _dict(doc.get("failure"))
    detail = " ".join(str(f[k]) for k in ("kind", "stage", "message") if f.get(k)) or "no details"
    return FailedRun(source, doc["model"], gpu, label, str(doc.get("status")), detail)


def why_unreadable(doc) -> str | None:
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        return f"not a {SCHEMA} result"
    version = doc.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        return f"schema version {version!r} is not one this report reads ({SCHEMA_VERSION})"
    if not isinstance(doc.get("model"), str):
        return "no model name"
    return None


# ---------------------------------------------------------------- the section's data


def read_measured(directory: Path | str | None, models: Sequence[str]) -> Measured:
    """Every readable result under `directory` (recursively) whose model is one of `models`."""
    directory = Path(directory) if directory is not None else MEASURED_DIR
    if not directory.is_dir():
        return Measured.empty(str(directory))
    files = sorted(directory.rglob("*.json"))
    wanted = set(models)
    points, failed, timelines, skipped, other = [], [], [], [], 0
    for path in files:
        try:
            from peftplan.planning.cards import read_text_file

            doc = json.loads(read_text_file(path, "result file", limit=2**26))  # regular files only: no FIFO
        except (PlanError, OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            skipped.append(f"{path.name}: not readable JSON ({type(e).__name__})")
            continue
        reason = why_unreadable(doc)
        if reason:
            skipped.append(f"{path.name}: {reason}")
            continue
        if doc["model"] not in wanted:
            other += 1
            continue
        gpu, label = gpu_of(doc), label_of(_dict(doc.get("plan")))
        if doc.get("status") != "ok":
            failed.append(failure_of(doc, path.name, gpu, label))
            continue
        points += points_of(doc, path.name, gpu, label)
        tl = timeline_of(doc, path.name, gpu, label)
        if tl is not None and len(timelines) < MAX_TIMELINES:
            timelines.append(tl)
    return Measured(directory=str(directory), files=len(files), points=tuple(points), failed=tuple(failed),
                    timelines=tuple(timelines), skipped=tuple(skipped), other_models=other)
