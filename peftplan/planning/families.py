"""Per-block memory terms of what the newer families do beyond the classic pre-norm block.

Each term reads an explicit card fact that cardgen recorded (the `qk_norm` flag and the norms' sizes in the
module tree, the config.json kept in the card) and returns bytes per token that `memory._block_saved_per_token`
adds to its generic count with one call line. Symbols as in memory.py: d hidden, q = h·d_h query width,
k = h_kv·d_h key/value width, e bytes per element.

    qk_norm_correction   q/k norms (Qwen3, OLMo-2, Gemma-3): the generic count treats every block norm as a
                         d-wide norm of the residual stream; a q/k norm normalises q (q elements) and k (k
                         elements) in groups of its own size (d_h per head in Qwen3/Gemma-3, the whole
                         projection in OLMo-2), saving a fp32 copy of its input and one fp32 rsqrt per group.
    unit_offset_norms    Gemma's RMSNorm scales by (1 + γ) in fp32 and casts after, so a training γ keeps x̂ in
                         fp32, not the compute dtype (transformers' Gemma3RMSNorm.forward).
    logit_softcap        the final logits soft-capped, cap·tanh(z / cap) (Gemma-2): tanh's output is saved.

Sources: transformers 5.24 models/qwen3 (Qwen3RMSNorm on q_proj/k_proj outputs viewed as (b, s, h, d_h)),
models/olmo2 (q_norm over h·d_h before the head split), models/gemma3 (Gemma3RMSNorm, q_norm/k_norm per head);
PyTorch's autograd save rules (pow and mul save their inputs, rsqrt its output).
"""
from __future__ import annotations

import re

from peftplan.planning.cards import ModelCard
from peftplan.planning.layout import Norm, layout
from peftplan.plan import Plan

FP32 = 4
_QK = re.compile(r"(^|\.)(q|k)_(norm|layernorm)$")


def qk_norms(card: ModelCard) -> tuple[Norm, ...]:
    """The block's query and key norms (empty unless the card's `qk_norm` fact is set)."""
    if not card.qk_norm:
        return ()
    return tuple(n for n in layout(card).block_norms if _QK.search(n.name))


def unit_offset_norms(card: ModelCard) -> bool:
    """RMSNorm with the (1 + γ) scale computed in fp32 (Gemma, Gemma-2, Gemma-3)."""
    return card.norm == "rmsnorm" and card.family in ("gemma", "gemma2", "gemma3")


def _rms_saved(width: int, groups: int, plan: Plan, e: int, scale_fp32: bool, weight_trains: bool) -> int:
    """An RMSNorm over `width` elements per token in `groups` groups: fp32 x, fp32 rsqrt per group, and the
    normalised x̂ (fp32 or e) when γ trains."""
    return FP32 * width + FP32 * groups + ((FP32 if scale_fp32 else e) * width if weight_trains else 0)


def qk_norm_correction(card: ModelCard, plan: Plan, e: int, generic_norm: float, weight_trains: bool) -> float:
    """Bytes per token to add to a block's count for its q/k norms: what they save minus `generic_norm`, the
    bytes per token the generic count gave each of them (a d-wide norm of the residual stream)."""
    norms = qk_norms(card)
    if not norms:
        return 0.0
    total = 0.0
    for n in norms:
        width = card.d_q if n.name.rsplit(".", 1)[-1].startswith("q") else card.d_kv
        total += _rms_saved(width, max(1, width // n.size), plan, e, unit_offset_norms(card), weight_trains)
    return total - len(norms) * generic_norm


def unit_offset_correction(card: ModelCard, e: int, weight_trains: bool) -> float:
    """Bytes per token to add for Gemma's fp32 x̂ in the d-wide block norms when γ trains (the generic count
    keeps x̂ in the compute dtype)."""
    if not (weight_trains and unit_offset_norms(card)) or card.family == "gemma2":  # gemma2: memory.norm_saved
        return 0.0
    wide = len(layout(card).block_norms) - len(qk_norms(card))
    return wide * (FP32 - e) * card.d_model


def block_correction(card: ModelCard, plan: Plan, e: int, generic_norm: float, weight_trains: bool) -> float:
    """Every family term of one block, bytes per token (the one call `memory._block_saved_per_token` makes)."""
    return (qk_norm_correction(card, plan, e, generic_norm, weight_trains)
            + unit_offset_correction(card, e, weight_trains))


def logit_softcap(card: ModelCard) -> float:
    """The final logit soft-cap (0: none), from the hand-written card's fields or the generated card's config."""
    cap = card.hf.get("final_logit_softcapping") or card.config.get("final_logit_softcapping")
    if not cap and isinstance(card.config.get("text_config"), dict):
        cap = card.config["text_config"].get("final_logit_softcapping")
    return float(cap or 0.0)
