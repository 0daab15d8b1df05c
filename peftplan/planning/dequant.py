"""QLoRA's backward dequantization in the lowest wrapped block, whose input needs no gradient.

bitsandbytes 0.50 `matmul_4bit` (bitsandbytes/autograd/_functions.py) runs its autograd Function `MatMul4Bit` only
when the input requires a gradient (`needs_grad = torch.is_grad_enabled() and A.requires_grad`, or a trained
bias); otherwise it runs the 4-bit GEMM with no graph node. `MatMul4Bit.backward` dequantizes the weight
(`dequantize_4bit(B).to(grad.dtype)`) only for the input's gradient (`req_gradA`). So a Linear4bit dequantizes in
backward only when its input needs a gradient. Above the lowest wrapped block every input does; in the lowest
one (not checkpointed: transformers' `enable_input_require_grads` makes the embedding output need one) only the
Linears downstream of a wrapped one (`memory._needs_grad`): with LoRA on the FFN's down projection alone, none.
`memory.phases` counts the largest Linear4bit's dequantization in every block's FFN backward; this module gives
the lowest block's own.
Pure Python: no torch.
"""
from __future__ import annotations

from peftplan.plan import Plan
from peftplan.planning.cards import ModelCard
from peftplan.planning.layout import layout


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
