"""peft's rewrite of LoRA targets for MoE models whose experts transformers 5 fused (no torch).

peft 0.21 with transformers 5 (peft/utils/transformers_weight_conversion.py, `_convert_peft_config_moe`, called
from `BaseTuner.inject_adapter`) rewrites the LoRA config of the model types transformers converts to the
Mixtral or Qwen2-MoE weight layout: targets named like the v4 per-expert Linears (and the router `gate`)
become `target_parameters` on the fused (E, ·, ·) expert parameters; "all-linear" is first resolved to the
leaf names of every Linear plus those v4 names, so it REACHES the experts and the router. A fused
`gate_up_proj` gets rank 2r (`rank_pattern`). Other MoE types (gpt-oss, Llama-4) are not rewritten: their
experts are parameters that all-linear never reaches.

peft's ParamWrapper (peft/tuners/lora/layer.py) on a parameter of shape (E, a, b) adds lora_A (a -> r·E) and
lora_B (r·E -> b): r·E·(a + b) parameters; a 2-D (out, in) parameter adds r·(in + out), like a Linear.
"""
from __future__ import annotations

from peftplan.errors import PlanError

# transformers 5.24 conversion_mapping._MODEL_TO_CONVERSION_PATTERN, entries whose pattern peft rewrites
# (plus "mixtral", which peft adds); tests compare this table with the installed peft and transformers.
PEFT_MOE_FAMILY: dict[str, str] = {
    "mixtral": "mixtral", "minimax": "mixtral", "minimax_m2": "mixtral",
    **{t: "qwen2_moe" for t in (
        "Dots3NoteTextModel", "afmoe", "deepseek_v2", "deepseek_v3", "deepseek_v32", "dots1", "ernie4_5_moe",
        "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "glm4v_moe", "longcat_flash", "solar_open", "mellum",
        "qwen3_moe", "beam", "qwen3_omni_moe", "qwen3_omni_moe_thinker", "qwen3_omni_moe_text", "qwen3_next",
        "hunyuan_v1_moe", "flex_olmo", "olmoe", "sarvam_mla", "exaone_moe", "cohere2_moe", "UnlimitedOcrTextModel")},
}
# v4 leaf name -> v5 parameter name (peft `_MOE_TARGET_MODULE_MAPPING`) and fused groups (`_MOE_FUSED_TARGETS`)
RENAMES: dict[str, dict[str, str]] = {
    "mixtral": {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
    "qwen2_moe": {"gate": "gate.weight", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj",
                  "down_proj": "down_proj"},
}
FUSED: dict[str, dict[str, tuple[str, ...]]] = {
    "mixtral": {"gate_up_proj": ("w1", "w3")},
    "qwen2_moe": {"gate_up_proj": ("gate_proj", "up_proj")},
}


def rewrite(model_type: str, kind: str, names: tuple[str, ...], linear_leaves: set[str]
            ) -> tuple[set[str], dict[str, int]] | None:
    """(module targets left, {parameter target: rank multiplier}) as peft rewrites them; None when peft leaves
    the model type alone. kind is parse_targets' "names" | "all-linear" | "regex". Raises PlanError as peft does.
    """
    family = PEFT_MOE_FAMILY.get(model_type)
    if family is None:
        return None
    renames, fused = RENAMES[family], FUSED[family]
    if kind == "regex":
        raise PlanError(f"regex LoRA targets on '{model_type}' (experts fused by transformers 5, targets rewritten "
                        "by peft) are not modelled; pass names or all-linear")
    targets = (linear_leaves | set(renames)) if kind == "all-linear" else set(names)
    modules: set[str] = set()
    params: dict[str, int] = {}
    matched: dict[str, set[str]] = {}
    for t in targets:
        old = next((o for o in renames if t == o or t.endswith("." + o)), None)
        if old is None:
            modules.add(t)
            continue
        params[renames[old]] = 1
        matched.setdefault(renames[old], set()).add(old)
    for new, olds in fused.items():
        present = matched.get(new, set())
        if 0 < len(present) < len(olds):
            raise PlanError(f"peft cannot convert target(s) {', '.join(sorted(present))} without also targeting "
                            f"{', '.join(sorted(set(olds) - present))}: transformers fuses them into {new}")
        if len(present) == len(olds) > 1:
            params[new] = len(olds)  # peft's rank_pattern: r·len(olds) on the fused parameter
    return modules, params


def param_lora_shape(shape: tuple[int, ...], mult: int) -> tuple[int, int]:
    """(d_in, d_out) of a Linear whose LoRA has the size of peft's ParamWrapper on `shape` at rank r·mult:
    r·d_in = numel(lora_A), d_out·r = numel(lora_B)."""
    if len(shape) == 3:
        experts, a, b = shape
        return experts * a * mult, experts * b * mult
    if len(shape) == 2:
        out, inp = shape
        return inp * mult, out * mult
    raise PlanError(f"peft cannot put LoRA on a {len(shape)}-D parameter")
