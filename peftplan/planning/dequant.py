"""QLoRA's backward through bitsandbytes' MatMul4Bit: where a Linear4bit dequantizes its weight.

The lowest wrapped block, whose input needs no gradient:

bitsandbytes 0.50 `matmul_4bit` (bitsandbytes/autograd/_functions.py) runs its autograd Function `MatMul4Bit` only
when the input requires a gradient (`needs_grad = torch.is_grad_enabled() and A.requires_grad`, or a trained
bias); otherwise it runs the 4-bit GEMM with no graph node. `MatMul4Bit.backward` dequantizes the weight
(`dequantize_4bit(B).to(grad.dtype)`) only for the input's gradient (`req_gradA`). So a Linear4bit dequantizes in
backward only when its input needs a gradient. Above the lowest wrapped block every input does; in the lowest
one (not checkpointed: transformers' `enable_input_require_grads` makes the embedding output need one) only the
Linears downstream of a wrapped one (`memory._needs_grad`): with LoRA on the FFN's down projection alone, none.
`memory.phases` counts the largest Linear4bit's dequantization in every block's FFN backward; this module gives
the lowest block's own.

Checkpointed blocks (replayed at the first unpack of one of their saved tensors: torch.utils.checkpoint,
non-reentrant) and fp32 models:

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

Pure Python: no torch.
"""
from __future__ import annotations

from peftplan.plan import Plan
from peftplan.planning.cards import ModelCard
from peftplan.planning.layout import layout
from peftplan.planning.params import lora_block_sets


def quiet_block_ffn_backward(card: ModelCard, plan: Plan, ae: int, ffn_bwd_frozen: int) -> int | None:
    """Bytes live beyond the lowest wrapped block's saved tensors at its FFN backward's peak, for QLoRA without
    checkpointing on a dense card: the FFN's gradients (`ffn_bwd_frozen`, as `memory.phases` computes them before
    dequantization), or the dequantized down projection with the output gradient arriving (when its input needs a
    gradient), or the largest other dequantized Linear whose input needs one with the FFN's input gradients
    (`memory._after_ffn_bytes`). None where the lowest block is not quiet (other methods, checkpointed, MoE).

    Shapes: Linear d_out × d_in (layout); tokens t = b·s; ae the activations' bytes per element.
    """
    from peftplan.planning import memory  # memory imports this module

    if plan.method != "qlora" or plan.grad_checkpointing or card.moe or not card.n_layers:
        return None
    _, wrapped = memory.lowest_lora_block(card, plan)
    names = set(memory._grad_input_linears(card, memory._needs_grad(card, plan, False, True, wrapped)))
    lin = [x for x in layout(card).block_linears if x.name in names]
    t = plan.tokens
    out = [x for x in lin if x.role == "ffn_out"]
    rest = [x for x in lin if x.role != "ffn_out"]
    deq_out = memory.dequantized_weight_bytes(card, plan, out[0].weight_numel) + ae * card.d_model * t if out else 0
    deq_in = (memory.dequantized_weight_bytes(card, plan, max(x.weight_numel for x in rest))
              + memory._after_ffn_bytes(card, plan, ae, False)) if rest else 0
    return max(ffn_bwd_frozen, deq_out, deq_in)


def top_is_lowest(card: ModelCard, plan: Plan) -> bool:
    """Whether the model's top block is the lowest wrapped one (one block, or targets naming only the top)."""
    from peftplan.planning import memory

    return plan.uses_lora and memory.lowest_lora_block(card, plan)[0] == card.n_layers - 1


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
    from peftplan.planning.memory import _groups

    if plan.method != "qlora" or plan.dtype != "fp32" or plan.autocast != "none" or card.moe:
        return 0
    lin = {x.name: x for x in layout(card).block_linears}
    width = sum(lin[n].d_out for n in _groups(card)[2])
    return (4 * (card.d_model + width) - 2 * width) * plan.tokens
