"""Many configurations in one run: a grid file or list-valued options become points, run one by one.

A grid file (TOML or JSON) holds optional `defaults` and a list `grid` of tables; in each table a list value
is an axis and the points are the cartesian product (defaults fill what a table leaves out):

    [defaults]
    steps = 3
    seq_len = 512

    [[grid]]
    model = ["opt-125m", "opt-1.3b"]
    method = ["full", "lora", "qlora"]
    batch_size = [1, 4]
    grad_checkpointing = [false, true]

Keys are `model`, the `Plan` fields and the `Settings` fields. `run_grid` runs each point isolated (memory
freed and peaks reset before it), hands each result to `save` as soon as it exists, goes on after a failed
point, and on KeyboardInterrupt or past its deadline stops and returns what it finished.
"""
from __future__ import annotations

import itertools
import json
import math
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Protocol

from peftplan.errors import PlanError, quote
from peftplan.planning.validate import check_work
from peftplan.plan import Plan
from peftplan.profile.store import Measurement, Settings, config_key

PLAN_FIELDS = tuple(f.name for f in fields(Plan))
SETTINGS_FIELDS = tuple(f.name for f in fields(Settings))
KEYS = ("model", *PLAN_FIELDS, *SETTINGS_FIELDS)


@dataclass(frozen=True)
class GridPoint:
    model: str
    plan: Plan
    settings: Settings = Settings()

    @property
    def key(self) -> str:
        return config_key(self.model, self.plan, self.settings)

    @property
    def label(self) -> str:
        p = self.plan
        parts = [self.model, p.method, f"b{p.batch_size}", f"s{p.seq_len}"]
        if p.grad_checkpointing:
            parts.append("ckpt")
        if p.optimizer != "adamw":
            parts.append(p.optimizer)
        if self.settings.impl != "peftplan":
            parts.append(self.settings.impl)
        if self.settings.tag:
            parts.append(self.settings.tag)
        if not self.settings.nvml:
            parts.append("no-nvml")
        return " ".join(parts)


# ---------------------------------------------------------------- building points


def point(spec: Mapping) -> GridPoint:
    """One point from a flat mapping of model, Plan and Settings fields (no lists)."""
    unknown = sorted(set(spec) - set(KEYS))
    if unknown:
        raise PlanError(f"unknown grid key(s) {', '.join(unknown)} (known: model, Plan and Settings fields)")
    if "model" not in spec:
        raise PlanError("a grid point needs a model")
    plan = Plan(**{k: v for k, v in spec.items() if k in PLAN_FIELDS})
    settings = Settings(**{k: v for k, v in spec.items() if k in SETTINGS_FIELDS})
    return GridPoint(str(spec["model"]), plan, settings)


def expand(spec: Mapping, defaults: Mapping | None = None, max_points: int | None = None) -> list[GridPoint]:
    """The cartesian product of the list-valued entries of `defaults | spec`, in the order the keys appear.

    The number of points (the product of the axis lengths) is checked against `max_points` before any is
    built: WorkTooLargeError past it (planning/validate.py `check_work`; the CLI's `--yes` lifts it).
    """
    merged = {**(defaults or {}), **spec}
    axes = [(k, v if isinstance(v, (list, tuple)) else [v]) for k, v in merged.items()]
    for k, values in axes:
        if not values:
            raise PlanError(f"grid axis {quote(k)} is empty")
    if max_points is not None:
        check_work("the number of grid points", math.prod(len(v) for _, v in axes), max_points, yes=False)
    keys = [k for k, _ in axes]
    return [point(dict(zip(keys, combo))) for combo in itertools.product(*(v for _, v in axes))]


def dedupe(points: Iterable[GridPoint]) -> list[GridPoint]:
    seen, out = set(), []
    for p in points:
        if p.key not in seen:
            seen.add(p.key)
            out.append(p)
    return out


def points_from_doc(doc, defaults: Mapping | None = None, max_points: int | None = None) -> list[GridPoint]:
    """Points from a parsed grid file: {defaults, grid: [...]}, a list of tables, or one table.

    `defaults` (e.g. the command line's settings) fill what the file's own defaults and tables leave out.
    """
    if isinstance(doc, list):
        doc = {"grid": doc}
    if not isinstance(doc, dict):
        raise PlanError("a grid file holds a table (with 'grid' and optional 'defaults') or a list of tables")
    if not isinstance(doc.get("defaults", {}), dict):
        raise PlanError("'defaults' must be a table")
    defaults = {**(defaults or {}), **doc.get("defaults", {})}
    tables = doc.get("grid")
    if tables is None:
        tables = [{k: v for k, v in doc.items() if k != "defaults"}]
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise PlanError("'grid' must be a list of tables")
    if max_points is not None:
        total = sum(math.prod(len(v) if isinstance(v, (list, tuple)) else 1 for v in {**defaults, **t}.values())
                    for t in tables)
        check_work("the number of grid points", total, max_points, yes=False)
    return dedupe(p for t in tables for p in expand(t, defaults, max_points))


def load_grid(path: Path | str, defaults: Mapping | None = None, max_points: int | None = None) -> list[GridPoint]:
    """Points from a grid file (TOML, or JSON by its suffix): a regular UTF-8 file of at most 16 MiB.

    Raises InputFileError (unreadable, FIFO, binary, too big), PlanError (does not parse, bad keys or
    values), WorkTooLargeError (more than `max_points` points).
    """
    from peftplan.planning.cards import read_text_file

    path = Path(path)
    text = read_text_file(path, "grid file")
    try:
        doc = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise PlanError(f"grid file {quote(str(path))} does not parse: {str(e).splitlines()[0][:200]}") from None
    except RecursionError:
        raise PlanError(f"grid file {quote(str(path))} is nested too deeply") from None
    try:
        return points_from_doc(doc, defaults, max_points)
    except (TypeError, RecursionError) as e:
        raise PlanError(f"grid file {quote(str(path))}: {type(e).__name__}: {str(e)[:200]}") from None


def split_list(text: str, convert: Callable = str) -> list:
    """'1,4' -> [1, 4]: a list-valued command-line option."""
    out = []
    for v in str(text).split(","):
        if v.strip():
            try:
                out.append(convert(v.strip()))
            except ValueError:
                raise PlanError(f"cannot read {quote(text)}: {quote(v.strip())} is not a whole number") from None
    return out


# ---------------------------------------------------------------- running


class Observer(Protocol):
    """What the caller sees of a running grid (the CLI draws a progress bar with it)."""

    def started(self, total: int) -> None: ...
    def point_started(self, index: int, point: GridPoint) -> None: ...
    def point_done(self, index: int, point: GridPoint, result: Measurement | None, error: str) -> None: ...


class _Silent:
    def started(self, total: int) -> None: ...
    def point_started(self, index: int, point: GridPoint) -> None: ...
    def point_done(self, index: int, point: GridPoint, result: Measurement | None, error: str) -> None: ...


@dataclass(frozen=True)
class GridResult:
    measurements: tuple[Measurement, ...]  # in the order they completed
    saved: tuple[Path, ...]
    errors: tuple[str, ...]  # "label: reason" of points that raised instead of returning a result
    not_run: tuple[GridPoint, ...]  # left when interrupted or out of time
    interrupted: bool = False
    out_of_time: bool = False
    aborted: bool = False  # too many failures in a row: something systematic, not one configuration

    @property
    def stopped_early(self) -> bool:
        return self.interrupted or self.out_of_time or self.aborted

    @property
    def counts(self) -> dict[str, int]:
        out = {"ok": 0, "does-not-fit": 0, "error": len(self.errors)}
        for m in self.measurements:
            out[m.status] = out.get(m.status, 0) + 1
        return out


def run_grid(points: Sequence[GridPoint], run_point: Callable[[GridPoint], Measurement], *,
             save: Callable[[Measurement], Path | None] | None = None, isolate: Callable[[], None] | None = None,
             observer: Observer | None = None, deadline: float | None = None,
             max_consecutive_errors: int | None = None, clock: Callable[[], float] = time.monotonic) -> GridResult:
    """Run every point in order; each result is saved as soon as it completes.

    A point whose `run_point` raises (a bug, not an OOM: those come back as results) is recorded in `errors`
    and the grid goes on. KeyboardInterrupt stops the grid and keeps what finished; so does `deadline`
    (a `clock()` value), checked before each point, and `max_consecutive_errors` failed points in a row
    (raised, or status "error"), which on a lent GPU means a broken setup not worth the remaining time.
    """
    obs = observer or _Silent()
    obs.started(len(points))
    done: list[Measurement] = []
    saved: list[Path] = []
    errors: list[str] = []
    interrupted = out_of_time = aborted = False
    failed_in_a_row = 0
    i = 0
    try:
        for i, p in enumerate(points):
            if deadline is not None and clock() >= deadline:
                out_of_time = True
                break
            if max_consecutive_errors is not None and failed_in_a_row >= max_consecutive_errors:
                aborted = True
                break
            if isolate is not None:
                isolate()
            obs.point_started(i, p)
            try:
                m = run_point(p)
            except Exception as e:  # noqa: BLE001 - one broken point must not lose the grid
                why = str(e) if isinstance(e, PlanError) else f"{type(e).__name__}: {e}"
                errors.append(f"{p.label}: {why}")
                failed_in_a_row += 1
                obs.point_done(i, p, None, why)
                continue
            failed_in_a_row = failed_in_a_row + 1 if m.status == "error" else 0
            done.append(m)
            if save is not None:
                path = save(m)
                if path is not None:
                    saved.append(path)
            obs.point_done(i, p, m, "")
        else:
            i = len(points)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if isolate is not None:
            try:
                isolate()
            except Exception:  # noqa: BLE001 - cleanup after the grid never hides its results
                pass
    return GridResult(measurements=tuple(done), saved=tuple(saved), errors=tuple(errors),
                      not_run=tuple(points[i:]) if (interrupted or out_of_time or aborted) else (),
                      interrupted=interrupted, out_of_time=out_of_time, aborted=aborted)
