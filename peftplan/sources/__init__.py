"""Training configs users already have, read into one Plan: `--from FILE` (repeatable).

Kinds, detected from the keys (never from the file name): a peft `adapter_config.json`, a BitsAndBytesConfig
(or a config.json's `quantization_config`), Trainer / TRL `SFTConfig` arguments (JSON or YAML), an axolotl YAML,
a LLaMA-Factory YAML. Files are merged in order; two files that set one field to different values are a
contradiction (an error), and explicit command-line flags override every file.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from peftplan.errors import PlanError
from peftplan.plan import Plan
from peftplan.sources import axolotl, llamafactory, peft_config, trainer
from peftplan.sources.common import Source, load_mapping, local_model

KINDS = ("peft", "bnb", "axolotl", "llamafactory", "trainer")


def read_source(path: str | Path) -> Source:
    """Read one file, detecting its kind. Raises PlanError (one line) for unreadable, malformed or unknown files."""
    p = Path(path)
    data = load_mapping(p)
    if peft_config.looks_like_peft(data):
        return peft_config.read_peft(data, p)
    if "quantization_config" in data and isinstance(data["quantization_config"], dict) and "model_type" in data:
        return peft_config.read_bnb(data["quantization_config"], p)  # a model's config.json with its bnb settings
    if llamafactory.looks_like(data):
        return llamafactory.read_llamafactory(data, p)
    if axolotl.looks_like(data):
        return axolotl.read_axolotl(data, p)
    if trainer.looks_like(data):
        return trainer.read_trainer(data, p)
    if peft_config.looks_like_bnb(data):
        return peft_config.read_bnb(data, p)
    raise PlanError(f"'{p}': not a recognised training config (peft adapter_config.json, BitsAndBytesConfig, "
                    "Trainer/TRL arguments, axolotl or LLaMA-Factory YAML)")


@dataclass(frozen=True)
class FromFiles:
    """Plan fields merged from several files, with where each came from."""

    fields: dict  # Plan field -> value
    origin: dict  # Plan field -> file that set it
    model: str | None  # the model reference a file names (unresolved)
    model_origin: str | None
    warnings: tuple[str, ...]
    unknown: tuple[str, ...]  # "file: key" for keys no reader knows
    unsupported: dict  # Plan field -> reason


def merge(sources: Sequence[Source]) -> FromFiles:
    """Merge in order. Raises PlanError when two files set one field to different values."""
    out: dict = {}
    origin: dict = {}
    model = model_origin = model_kind = None
    warnings: list[str] = []
    unknown: list[str] = []
    unsupported: dict = {}
    defaults: dict = {}
    for s in sources:
        name = Path(s.path).name
        for k, v in s.fields.items():
            if k in out and out[k] != v:
                raise PlanError(f"contradictory configs: {Path(origin[k]).name} sets {_public(k)} = {out[k]!r}, "
                                f"{name} sets {v!r}")
            out[k], origin[k] = v, s.path
        if s.model is not None:
            # a training config's local model path wins over the Hub id an adapter_config.json records
            if model is not None and model != s.model and s.kind != "peft" and model_kind != "peft":
                raise PlanError(f"contradictory configs: {Path(model_origin).name} names model '{model}', "
                                f"{name} names '{s.model}'")
            if model is None or (s.kind != "peft" and model_kind == "peft"):
                model, model_origin, model_kind = s.model, s.path, s.kind
        for k, v in s.defaults.items():
            defaults.setdefault(k, (v, s.path))
        warnings += s.warnings
        unknown += [f"{name}: {k}" for k in s.unknown]
        unsupported.update(s.unsupported)
    for k, (v, path) in defaults.items():  # a tool's default applies only where no file says otherwise
        if k not in out:
            out[k], origin[k] = v, path
    # LoRA (peft) over a 4-bit base (bitsandbytes) is QLoRA
    if out.pop("_load_in_4bit", False):
        origin.pop("_load_in_4bit", None)
        if out.get("method", "lora") not in ("lora", "qlora"):
            raise PlanError(f"contradictory configs: 4-bit loading with method {out['method']} cannot train")
        out["method"] = "qlora"
    return FromFiles(out, origin, model, model_origin, tuple(warnings), tuple(unknown), unsupported)


def _public(field: str) -> str:
    return field.replace("_", "-")


PLAN_FIELDS = frozenset(f.name for f in fields(Plan))


def apply(merged: FromFiles, base: Plan, explicit: Iterable[str]) -> tuple[Plan, list[str]]:
    """`base` (the command line's plan) with the files' fields, except those set by explicit flags.

    Raises PlanError for a field a file sets that this peftplan has no option for, and for an unsupported value
    (e.g. an optimizer not modelled) that no explicit flag overrides.
    """
    explicit = set(explicit)
    for k, reason in merged.unsupported.items():
        if k not in explicit:
            raise PlanError(f"{reason}; override it with --{_public(k)}")
    changes = {}
    notes = []
    for k, v in merged.fields.items():
        if k in explicit:
            continue
        if k not in PLAN_FIELDS:
            notes.append(f"{Path(merged.origin[k]).name}: {_public(k)} = {v!r} has no peftplan option yet: ignored")
            continue
        changes[k] = v
    return base.with_(**changes), notes


def resolve_model(merged: FromFiles) -> str | None:
    """The file's model as something peftplan can load (a local config path or a card), else PlanError."""
    if merged.model is None:
        return None
    return local_model(merged.model, Path(merged.model_origin))


def plan_from_files(paths: Sequence[str | Path], base: Plan, explicit: Iterable[str] = (),
                    model: str | None = None) -> tuple[str | None, Plan, list[str]]:
    """(model, plan, warnings) from `--from` files over the command line's plan.

    `explicit`: the Plan fields given as flags (they win); `model`: an explicit --model (wins over the files').
    Warnings name every memory-relevant key that is not modelled and list unknown keys once.
    """
    merged = merge([read_source(p) for p in paths])
    plan, notes = apply(merged, base, explicit)
    chosen = model if model is not None else resolve_model(merged)
    warnings = list(merged.warnings) + notes
    if merged.unknown:
        warnings.append("keys not read (no memory effect known): " + ", ".join(merged.unknown))
    return chosen, plan, warnings


__all__ = ["KINDS", "FromFiles", "Source", "apply", "merge", "plan_from_files", "read_source"]
