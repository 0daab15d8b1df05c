"""What every training-config reader shares: the typed result, file loading, and typed field access.

A reader turns one file a user already has (a peft `adapter_config.json`, Trainer/TRL arguments, an axolotl or
LLaMA-Factory YAML) into `Source`: the Plan fields it fixes, the model it names (a local config.json path, never a
Hub download), and what it could not model. Readers are pure Python (PyYAML only): the planning path stays
torch-free.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from peftplan.errors import PlanError

MAX_CONFIG_BYTES = 4 * 2**20  # a training config is a few KiB; anything larger is not one


@dataclass(frozen=True)
class Source:
    """One training-config file read into Plan fields.

    `fields` uses Plan's field names (method, r, alpha, dropout, targets, use_dora, batch_size, seq_len, dtype,
    autocast, optimizer, foreach, grad_checkpointing, use_reentrant, attention, grad_accum, max_grad_norm,
    double_quant, kbit_prep). `unsupported` maps a Plan field to why the file's value cannot be planned (e.g. an
    optimizer peftplan does not model): an error unless an explicit flag overrides that field.
    """

    kind: str  # "peft" | "trainer" | "axolotl" | "llamafactory"
    path: str
    fields: dict = field(default_factory=dict)
    model: str | None = None  # local config.json / model folder the file names, if any
    warnings: tuple[str, ...] = ()  # keys that change memory and are not modelled (named)
    unknown: tuple[str, ...] = ()  # keys this reader does not know (listed once)
    unsupported: dict = field(default_factory=dict)  # Plan field -> reason its value cannot be planned
    defaults: dict = field(default_factory=dict)  # the tool's defaults for fields the file leaves out


def load_mapping(path: Path) -> dict:
    """A JSON or YAML file holding one mapping. Raises PlanError (one line) for anything else."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise PlanError(f"cannot read '{path}': {e.strerror or e}") from None
    if not path.is_file():
        raise PlanError(f"'{path}' is not a file")
    if size > MAX_CONFIG_BYTES:
        raise PlanError(f"'{path}' is {size:,} bytes: too large for a training config")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PlanError(f"cannot read '{path}': {getattr(e, 'strerror', None) or e}") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise PlanError(f"'{path}' is not valid JSON: {str(e).splitlines()[0]}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except (yaml.YAMLError, RecursionError) as e:
            first = " ".join(str(e).split())
            raise PlanError(f"'{path}' is not valid YAML: {first[:160]}") from None
    if not isinstance(data, dict):
        raise PlanError(f"'{path}' does not hold a mapping of keys to values")
    return data


class Fields:
    """Typed reads of one config mapping; a wrong type or value is one PlanError naming the file and key."""

    def __init__(self, data: dict, path: Path) -> None:
        self.data, self.path = data, path

    def _bad(self, key: str, what: str) -> PlanError:
        return PlanError(f"{self.path.name}: '{key}' must be {what}, got {self.data[key]!r}")

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def int(self, key: str, minimum: int = 1) -> int | None:
        v = self.data.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int | float) or (isinstance(v, float) and not v.is_integer()):
            raise self._bad(key, "an integer")
        if v < minimum:
            raise self._bad(key, f"at least {minimum}")
        return int(v)

    def float(self, key: str, lo: float = 0.0, hi: float = math.inf, hi_open: bool = False) -> float | None:
        v = self.data.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise self._bad(key, "a finite number")
        if v < lo or v > hi or (hi_open and v >= hi):
            raise self._bad(key, f"in [{lo}, {hi}{')' if hi_open else ']'}")
        return float(v)

    def bool(self, key: str, auto: bool | None = None) -> bool | None:
        """true/false (YAML also spells them as strings); 'auto' (axolotl's bf16) reads as `auto`."""
        v = self.data.get(key)
        if v is None:
            return None
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.lower() in ("true", "false"):
            return v.lower() == "true"
        if isinstance(v, str) and v.lower() == "auto" and auto is not None:
            return auto
        raise self._bad(key, "true or false")

    def str(self, key: str) -> str | None:
        v = self.data.get(key)
        if v is None:
            return None
        if not isinstance(v, str):
            raise self._bad(key, "a string")
        return v

    def use_reentrant(self) -> bool:
        """`gradient_checkpointing_kwargs["use_reentrant"]`; transformers 5 checkpoints with use_reentrant=False
        when no kwargs are given (modeling_utils `_activation_checkpointing_enable`)."""
        kwargs = self.data.get("gradient_checkpointing_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise PlanError(f"{self.path.name}: 'gradient_checkpointing_kwargs' must be a mapping, got {kwargs!r}")
        reentrant = kwargs.get("use_reentrant", False)
        if not isinstance(reentrant, bool):
            raise PlanError(f"{self.path.name}: 'use_reentrant' must be true or false, got {reentrant!r}")
        return reentrant

    def targets(self, key: str) -> str | None:
        """peft's target_modules: a list of names, one name, 'all-linear', or a regex string (full match)."""
        v = self.data.get(key)
        if v is None:
            return None
        if isinstance(v, list):
            if not v or not all(isinstance(t, str) and t.strip() for t in v):
                raise self._bad(key, "a non-empty list of module names")
            return ",".join(t.strip() for t in v)
        if isinstance(v, str):
            return v
        raise self._bad(key, "a list of module names or a string")


def local_model(value: str | None, path: Path) -> str | None:
    """A model named by a config file: a local folder or config.json (relative to the file or the working
    directory), or a shipped card's name. A Hub id that is neither is an error: nothing is downloaded."""
    if value is None:
        return None
    for base in (Path.cwd(), path.parent):
        candidate = (base / value).expanduser()
        if candidate.is_dir() or (candidate.is_file() and candidate.suffix == ".json"):
            return str(candidate)
    from peftplan.planning.cards import MODELS_DIR

    if (MODELS_DIR / f"{value}.toml").is_file():
        return value
    raise PlanError(f"{path.name}: model '{value}' is not a local path; peftplan downloads nothing: pass the "
                    "model's config.json (or its folder) with --model")


def unknown_keys(data: dict, known: set[str]) -> tuple[str, ...]:
    return tuple(sorted(k for k in data if k not in known))


def memory_warnings(data: dict, unmodelled: dict[str, str], path: Path) -> tuple[str, ...]:
    """A warning per key that is set, changes memory, and is not modelled."""
    out = []
    for key, why in unmodelled.items():
        v = data.get(key)
        if v not in (None, False, "", [], {}, 0):
            out.append(f"{path.name}: '{key}' ({why}) is not modelled")
    return tuple(out)
