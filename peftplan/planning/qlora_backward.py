"""QLoRA's backward through bitsandbytes' MatMul4Bit (autograd/_functions.py) beyond memory.py's generic terms.
A checkpointed block is replayed at the first unpack of one of its saved tensors (torch.utils.checkpoint,
non-reentrant).

    down_proj_before_recompute  QLoRA: bitsandbytes' MatMul4Bit keeps its weight on `ctx.tensors`, not through
                         `ctx.save_for_backward` (autograd/_functions.py MatMul4Bit.forward), so a frozen 4-bit
                         down projection's backward unpacks nothing: when nothing after it in the block saves a
                         tensor (no LoRA on it, no sublayer-output dropout mask, no norm after the FFN), it runs,
                         dequantizing its weight, before the block is recomputed — beside the block's kept input,
                         not beside its recomputed saved tensors.
    input_grad_overcount  a fp32 model's Linear4bit computes in bf16 (peftplan.inject: bnb compute dtype), casting
                         its input to bf16 and its output back: the gradient reaching MatMul4Bit is bf16, and its
                         backward peaks at `dequantize_4bit(B).to(grad.dtype)` (the fp32 dequantized weight and its
                         bf16 cast), before the input's gradient exists.
"""
from __future__ import annotations

from peftplan.plan import Plan
from peftplan.planning.cards import ModelCard
from peftplan.planning.params import lora_block_sets


def down_proj_before_recompute(card: ModelCard, plan: Plan) -> bool:
    """True when every checkpointed block's FFN output projection (a frozen bitsandbytes Linear4bit) runs its
    backward before the block's recomputation: QLoRA, gradient checkpointing (non-reentrant), a dense FFN whose
    output projection no block wraps with LoRA, no dropout on the sublayer outputs (its mask is a saved tensor)
    and a pre-norm block (a post-norm's LayerNorm after the FFN saves its input). Source: bitsandbytes
    autograd/_functions.py MatMul4Bit; torch/utils/checkpoint.py `_checkpoint_hook`."""
    from peftplan.planning.memory import _groups, _post_norm

    if plan.method != "qlora" or not plan.grad_checkpointing or plan.use_reentrant or card.moe:
        return False
    if card.hidden_dropout > 0 or _post_norm(card):
        return False
    ffn_out = _groups(card)[3]
    return bool(ffn_out) and not any(ffn_out in s for s in lora_block_sets(card, plan.targets))


def input_grad_overcount(card: ModelCard, plan: Plan) -> int:
    """Bytes by which memory._after_ffn_bytes over-counts the gradients alive while a 4-bit FFN input projection
    of a fp32 model (no autocast) runs its backward: it counts the outputs' gradient and the input's in fp32,
    where the peak (the dequantized weight's bf16 cast) holds the outputs' gradient in bf16 and no input
    gradient yet: (4·(d + w) − 2·w)·tokens, w the FFN input projections' total width. 0 otherwise. Source:
    bitsandbytes nn/modules.py Linear4bit.forward (`x.to(compute_dtype)`, `out.to(inp_dtype)`),
    autograd/_functions.py MatMul4Bit.backward."""
    from peftplan.planning.layout import layout
    from peftplan.planning.memory import _groups

    if plan.method != "qlora" or plan.dtype != "fp32" or plan.autocast != "none" or card.moe:
        return 0
    lin = {x.name: x for x in layout(card).block_linears}
    width = sum(lin[n].d_out for n in _groups(card)[2])
    return (4 * (card.d_model + width) - 2 * width) * plan.tokens
