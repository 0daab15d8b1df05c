"""Training FLOPs per token by method, step time and cost on a GPU card.

PaLM (Chowdhery et al. 2022, appendix B): a dense step costs 6N + 12·L·H·Q·T FLOPs per token —
2N forward, 4N backward (2N for input gradients, 2N for weight gradients) and the attention terms.
With a frozen base (LoRA, adapters, QLoRA) the backward still propagates input gradients through every
block above the lowest trained parameter but skips the base's weight gradients: 4N + 6·N_trainable.
Gradient checkpointing runs the forward twice.
"""
from __future__ import annotations

from functools import lru_cache

from peftplan.planning.cards import ModelCard
from peftplan.planning.layout import layout
from peftplan.planning.params import ParamCounts
from peftplan.plan import Plan
from peftplan.results import Time

# Assumed model-FLOPs utilisation (fraction of the card's dense peak) per method, until measured
# (profiles/measured/ throughput results replace these; see issue 8). Frozen-base methods run many
# small adapter matmuls and elementwise ops; QLoRA also dequantizes every NF4 weight on each use.
UTILISATION = {"full": 0.45, "top": 0.40, "adapter": 0.35, "lora": 0.35, "qlora": 0.25}


@lru_cache(maxsize=1024)
def matmul_params(card: ModelCard) -> int:
    """N: weights that take part in matmuls (block linears and the output head); lookups are free."""
    lay = layout(card)
    blocks = card.n_layers * sum(x.weight_numel for x in lay.block_linears)
    return blocks + sum(x.weight_numel for x in lay.other_linears) + lay.head_rows * lay.head_cols


def attention_flops_per_token(card: ModelCard, seq_len: int) -> float:
    """Forward QKᵀ and A·V: 2·2·s·(h·d_h) per token per block (the causal half is not subtracted, as PaLM)."""
    return 4.0 * card.n_layers * seq_len * card.d_q


def flops_per_token(card: ModelCard, plan: Plan, p: ParamCounts) -> float:
    n = matmul_params(card)
    attn_fwd = attention_flops_per_token(card, plan.seq_len)
    forward = 2.0 * n + attn_fwd
    if plan.method == "full":
        backward = 4.0 * n + 2 * attn_fwd
    elif plan.method == "top":
        lay = layout(card)
        per_block = sum(x.weight_numel for x in lay.block_linears)
        head = lay.head_rows * lay.head_cols
        k = plan.top_k
        backward = 2.0 * head + 4.0 * k * per_block + 2 * attn_fwd * k / card.n_layers
    else:
        added = 2.0 * p.added  # the adapters' own forward
        forward += added
        backward = 2.0 * n + 2 * attn_fwd + 2.0 * added
    recompute = forward if plan.grad_checkpointing else 0.0
    return forward + backward + recompute


def step_time(card: ModelCard, plan: Plan, p: ParamCounts, peak_tflops: float, price_per_hour_usd: float,
              gpu_name: str, tokens: int = 0, utilisation: float | None = None) -> Time:
    u = UTILISATION[plan.method] if utilisation is None else utilisation
    per_token = flops_per_token(card, plan, p)
    per_step = per_token * plan.tokens
    seconds = per_step / (peak_tflops * 1e12 * u)
    tokens_per_s = plan.tokens / seconds
    hours = tokens / tokens_per_s / 3600.0 if tokens else 0.0
    return Time(
        gpu=gpu_name, flops_per_token=per_token, flops_per_step=per_step, utilisation=u,
        peak_tflops=peak_tflops, step_time_s=seconds, tokens_per_s=tokens_per_s, tokens=tokens,
        gpu_hours=hours, cost_usd=hours * price_per_hour_usd,
    )
