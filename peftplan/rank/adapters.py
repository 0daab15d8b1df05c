"""Read a peft LoRA adapter: its A matrices per targeted module, its rank and its base model. No torch.

An adapter is a peft folder (`adapter_config.json` + `adapter_model.safetensors`, as `save_pretrained` writes
it) or a bare safetensors file of LoRA weights. peft's key naming (peft/utils/save_and_load.py,
`get_peft_model_state_dict`): `base_model.model.<module path>.lora_A.weight` (r × d_in) and `...lora_B.weight`
(d_out × r); the adapter name is stripped on save, a state dict of the live model keeps it
(`...lora_A.default.weight`), both are read. Tensors are read with the `safetensors` package (numpy); bf16,
which numpy lacks, is widened to fp32 from its raw bits.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, deserialize, safe_open

from peftplan.errors import PlanError

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
LAYER = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class LoraModule:
    """One targeted module of an adapter."""

    module: str  # the module path in the base model: "model.layers.3.self_attn.q_proj"
    kind: str  # the path with the layer index as '*': "model.layers.*.self_attn.q_proj"
    layer: int | None  # the block index (the last number in the path), None outside the blocks
    r: int
    d_in: int
    d_out: int


@dataclass(frozen=True)
class LoraAdapter:
    path: str
    modules: tuple[LoraModule, ...]  # sorted by kind, then layer
    base_model: str | None  # adapter_config.json's base_model_name_or_path (None for a bare file)
    config_dir: str | None  # the folder that may hold the base model's config.json beside the adapter
    a: dict = field(compare=False, repr=False)  # module path -> A (r × d_in, float32 ndarray)

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(sorted({m.r for m in self.modules}))


def split_module(module: str) -> tuple[str, int | None]:
    """(kind, layer) of a module path: the last `.<number>.` component is the layer index."""
    found = list(LAYER.finditer(f".{module}."))
    if not found:
        return module, None
    last = found[-1]
    start, end = last.span(1)
    return module[: start - 1] + "*" + module[end - 1:], int(last.group(1))


def _weights_file(path: Path) -> tuple[Path, dict | None]:
    """The safetensors file and the adapter config (None when only a file was given)."""
    if path.is_dir():
        config_path, weights = path / CONFIG, path / WEIGHTS
        if not weights.is_file():
            old = (path / "adapter_model.bin").is_file()
            bin_hint = " (it has adapter_model.bin: re-save it with safe_serialization=True)" if old else ""
            raise PlanError(f"no {WEIGHTS} in '{path}'{bin_hint}")
        if not config_path.is_file():
            return weights, None
        try:
            config = json.loads(config_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PlanError(f"'{config_path}' is not valid JSON: {e}") from None
        if not isinstance(config, dict):
            raise PlanError(f"'{config_path}' does not hold a JSON object")
        peft_type = str(config.get("peft_type", "LORA"))
        if peft_type.upper() != "LORA":
            raise PlanError(f"'{path}' is a {peft_type} adapter, not LoRA")
        return weights, config
    if path.is_file():
        return path, None
    raise PlanError(f"no adapter at '{path}' (a peft adapter folder or a .safetensors file)")


def _read_tensors(weights: Path, keys: list[str]) -> dict[str, np.ndarray]:
    """The named tensors as float32 arrays."""
    out = {}
    try:
        with safe_open(str(weights), framework="numpy") as f:
            bf16 = [k for k in keys if f.get_slice(k).get_dtype() == "BF16"]
            for k in keys:
                if k not in bf16:
                    out[k] = f.get_tensor(k).astype(np.float32)
        if bf16:  # numpy has no bfloat16: its bits are the top half of a float32's
            wanted = set(bf16)
            for name, t in deserialize(weights.read_bytes()):
                if name in wanted:
                    bits = np.frombuffer(bytes(t["data"]), dtype="<u2").astype(np.uint32) << 16
                    out[name] = bits.view(np.float32).reshape(t["shape"])
    except (SafetensorError, OSError, TypeError) as e:
        raise PlanError(f"cannot read '{weights}': {e}") from None
    return out


def read_adapter(path: str | Path) -> LoraAdapter:
    """The LoRA modules of an adapter folder or safetensors file.

    Raises PlanError (one line) for a missing path, a file safetensors cannot read, a non-LoRA adapter
    (peft_type other than LORA, or no `lora_A` keys), a module with lora_A but no lora_B (or the reverse),
    A/B shapes that disagree on r, or non-finite values in an A matrix.
    """
    path = Path(path)
    weights, config = _weights_file(path)

    try:
        with safe_open(str(weights), framework="numpy") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise PlanError(f"cannot read '{weights}' as safetensors: {e}") from None
    parts: dict[str, dict[str, str]] = {}
    for key in shapes:
        m = LORA_KEY.match(key)
        if m:
            module = m["module"].removeprefix(PREFIX)
            parts.setdefault(module, {})[m["ab"]] = key
    if not any("A" in p for p in parts.values()):
        raise PlanError(f"'{weights}' holds no LoRA weights (no '*.lora_A.weight' keys among {len(shapes)} tensors)")
    modules = []
    for module, p in parts.items():
        if "A" not in p or "B" not in p:
            missing = "lora_B" if "B" not in p else "lora_A"
            raise PlanError(f"'{weights}': module '{module}' has no {missing}.weight")
        a_shape, b_shape = shapes[p["A"]], shapes[p["B"]]
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise PlanError(f"'{weights}': module '{module}' has lora_A {list(a_shape)} and lora_B {list(b_shape)}, "
                            "not r × d_in and d_out × r")
        kind, layer = split_module(module)
        modules.append(LoraModule(module=module, kind=kind, layer=layer, r=a_shape[0], d_in=a_shape[1],
                                  d_out=b_shape[0]))
    modules.sort(key=lambda m: (m.kind, -1 if m.layer is None else m.layer, m.module))
    a_keys = {parts[m.module]["A"]: m.module for m in modules}
    tensors = _read_tensors(weights, list(a_keys))
    for key, t in tensors.items():
        if not np.isfinite(t).all():
            raise PlanError(f"'{weights}': lora_A of '{a_keys[key]}' holds NaN or infinite values")
    base = config.get("base_model_name_or_path") if config else None
    return LoraAdapter(path=str(path), modules=tuple(modules), base_model=str(base) if base else None,
                       config_dir=str(weights.parent), a={a_keys[k]: v for k, v in tensors.items()})


def write_adapter(folder: str | Path, a: dict[str, np.ndarray], d_out: dict[str, int], base_model: str | None,
                  b_scale: float = 0.0, peft_type: str = "LORA") -> Path:
    """Write a peft-layout LoRA adapter folder (adapter_config.json + adapter_model.safetensors), the inverse of
    `read_adapter`: `a` maps module paths ("model.layers.0.self_attn.q_proj") to A (r × d_in); B (d_out × r) is
    `b_scale` times ones (peft initialises it to zeros). For synthetic adapters in tests and benchmarks."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, mat in a.items():
        mat = np.ascontiguousarray(mat, dtype=np.float32)
        tensors[f"{PREFIX}{module}.lora_A.weight"] = mat
        tensors[f"{PREFIX}{module}.lora_B.weight"] = np.full((d_out[module], mat.shape[0]), b_scale, np.float32)
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    ranks = sorted({m.shape[0] for m in a.values()})
    targets = sorted({m.rsplit(".", 1)[-1] for m in a})
    config = {"peft_type": peft_type, "r": ranks[0], "lora_alpha": ranks[0], "target_modules": targets,
              "base_model_name_or_path": base_model}
    (folder / CONFIG).write_text(json.dumps(config, indent=1))
    return folder
