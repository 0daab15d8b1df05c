"""A peft `adapter_config.json` (LoraConfig.to_dict()) and a bitsandbytes `BitsAndBytesConfig` as Plan fields.

peft 0.21 LoraConfig (peft/tuners/lora/config.py): `r`, `lora_alpha`, `lora_dropout`, `target_modules` (a list
matched by exact name or `.suffix`, a string matched as a full regex, or "all-linear"), `use_dora`,
`modules_to_save`, `task_type`, `base_model_name_or_path`; `layers_to_transform` / `rank_pattern` /
`alpha_pattern` / `target_parameters` change which tensors train and are named as unmodelled.
A BitsAndBytesConfig (transformers/utils/quantization_config.py) with `load_in_4bit` and NF4 is QLoRA's storage;
`bnb_4bit_use_double_quant` is the double quantization of the absmax constants.
"""
from __future__ import annotations

from pathlib import Path

from peftplan.errors import PlanError
from peftplan.sources.common import Fields, Source, memory_warnings, unknown_keys

PEFT_UNMODELLED = {
    "modules_to_save": "a trainable full copy of each listed module",
    "layers_to_transform": "LoRA on some blocks only",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module scaling (no memory effect) with per-module ranks",
    "target_parameters": "LoRA on nn.Parameter targets (MoE experts)",
    "trainable_token_indices": "trainable token rows",
}

PEFT_KNOWN = set(PEFT_UNMODELLED) | {
    "peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "use_dora", "task_type",
    "base_model_name_or_path", "bias", "fan_in_fan_out", "init_lora_weights", "use_rslora", "revision",
    "inference_mode", "auto_mapping", "layers_pattern", "megatron_config", "megatron_core", "loftq_config",
    "exclude_modules", "layer_replication", "runtime_config", "lora_bias", "eva_config", "corda_config",
    "use_qalora", "qalora_group_size", "peft_version", "alora_invocation_tokens", "arrow_config",
    "ensure_weight_tying", "lora_ga_config",
}

BNB_KNOWN = {
    "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype",
    "bnb_4bit_quant_storage", "llm_int8_threshold", "llm_int8_skip_modules", "llm_int8_enable_fp32_cpu_offload",
    "llm_int8_has_fp16_weight", "quant_method", "_load_in_4bit", "_load_in_8bit",
}


def looks_like_peft(data: dict) -> bool:
    return "peft_type" in data or ("lora_alpha" in data and "r" in data)


def looks_like_bnb(data: dict) -> bool:
    return "bnb_4bit_quant_type" in data or data.get("quant_method") == "bitsandbytes" or set(data) <= BNB_KNOWN


def read_peft(data: dict, path: Path) -> Source:
    f = Fields(data, path)
    kind = f.str("peft_type")
    if kind is not None and kind.upper() != "LORA":
        raise PlanError(f"{path.name}: peft_type '{kind}' is not planned (peftplan plans LoRA adapters)")
    out: dict = {"method": "lora"}
    if (r := f.int("r")) is not None:
        out["r"] = r
    if (a := f.float("lora_alpha", lo=0.0)) is not None:
        out["alpha"] = a
    if (d := f.float("lora_dropout", lo=0.0, hi=1.0, hi_open=True)) is not None:
        out["dropout"] = d
    if (t := f.targets("target_modules")) is not None:
        # peft: a string that is not "all-linear" is a regex matched in full
        out["targets"] = t if isinstance(data["target_modules"], list) or t.lower() == "all-linear" else f"re:{t}"
    if (dora := f.bool("use_dora")) is not None:
        out["use_dora"] = dora
    warnings = list(memory_warnings(data, PEFT_UNMODELLED, path))
    bias = f.str("bias")
    if bias not in (None, "none"):
        warnings.append(f"{path.name}: 'bias: {bias}' trains bias vectors: not modelled")
    task = f.str("task_type")
    if task not in (None, "CAUSAL_LM"):
        warnings.append(f"{path.name}: task_type {task}: planned as the causal-LM (or masked-LM) model; its task head "
                        "is not modelled")
    return Source(kind="peft", path=str(path), fields=out, model=f.str("base_model_name_or_path"),
                  warnings=tuple(warnings), unknown=unknown_keys(data, PEFT_KNOWN))


def read_bnb(data: dict, path: Path) -> Source:
    f = Fields(data, path)
    out: dict = {}
    unsupported: dict = {}
    four, eight = f.bool("load_in_4bit"), f.bool("load_in_8bit")
    if four and eight:
        raise PlanError(f"{path.name}: load_in_4bit and load_in_8bit are both true")
    warnings = []
    if four:
        out["_load_in_4bit"] = True
        if (dq := f.bool("bnb_4bit_use_double_quant")) is not None:
            out["double_quant"] = dq
        qt = f.str("bnb_4bit_quant_type")
        if qt not in (None, "nf4"):
            warnings.append(f"{path.name}: bnb_4bit_quant_type '{qt}' stores like NF4 (same bytes); planned as NF4")
    if eight:
        unsupported["method"] = f"{path.name}: 8-bit LLM.int8 loading is not modelled (4-bit NF4 is)"
    return Source(kind="bnb", path=str(path), fields=out, warnings=tuple(warnings),
                  unknown=unknown_keys(data, BNB_KNOWN), unsupported=unsupported)
