"""Mixed precision (fp32 weights under the Trainer's autocast): when a trained block's weight copies die in backward.

Under autocast each block Linear computes with an autocast-dtype copy of its fp32 weight; autograd saves that
copy (`addmm` / `mm` keep `mat2` for the input's gradient) and frees it once the node has run (torch's engine
releases a node's saved variables after `apply`: torch/csrc/autograd/engine.cpp, `call_function`). The autocast
cache keeps nothing past the region: `torch.autocast.__exit__` clears it when the Trainer's `compute_loss`
returns, before `backward()` (torch/amp/autocast_mode.py, `clear_autocast_cache`). So in a trained block's
backward the FFN output projection's copy is gone once its node ran: by the time its input gradient flows into
the FFN and the input projections write their weight gradients (`memory.phases`, lowest trained block), only
the copies of the Linears not yet reached are alive. The output projection's own weight gradient comes in the
autocast dtype and is cast to fp32 (`ToCopyBackward`); `memory.phases` counts that fp16 gradient in the place
of the copy at the output projection's own moment.
Pure Python: no torch.
"""
from __future__ import annotations

from peftplan.plan import DTYPES, Plan
from peftplan.planning.cards import ModelCard
from peftplan.planning.layout import layout


def down_copy_freed_bytes(card: ModelCard, plan: Plan) -> int:
    """Bytes of the FFN output projection's autocast weight copy (weight and bias, as
    `memory.block_cache_bytes` counts them) that are no longer alive after its backward node ran, in a trained
    block (full fine-tuning, top-k) under mixed precision; 0 otherwise (no copies, or the block is frozen).

    Shapes: d_out × d_in of the block's FFN output Linear (layout), autocast dtype bytes per element.
    """
    if not plan.mixed_precision or plan.method not in ("full", "top"):
        return 0
    down = next((x for x in layout(card).block_linears if x.role == "ffn_out"), None)
    return 0 if down is None else DTYPES[plan.autocast] * (down.weight_numel + (down.d_out if down.bias else 0))


# transformers' Olmo2DecoderLayer (models/olmo2/modeling_olmo2.py) and Olmo3's: h = x + norm(attn(x)),
# out = h + norm(mlp(h)); the attention's input Linears read the block's input itself, no norm before them
NORM_AFTER_SUBLAYER = ("olmo2", "olmo3")


def attention_reads_block_input(card: ModelCard) -> bool:
    """Whether a block's attention input Linears read the block's input itself, with no trained norm between:
    post-norm blocks (BERT, RoBERTa, OPT-350m: `memory._post_norm`) and OLMo-2's norm-after-sublayer blocks.
    Then, in the lowest trained block of top-k fine-tuning, their input needs no gradient, so autograd saves
    none of their autocast weight copies (torch's mm backward keeps mat2 only for self's gradient), and the
    copies cached through forward die when the autocast region ends (`memory.top_quiet_copies_bytes`)."""
    from peftplan.planning.memory import _post_norm  # memory imports this module

    return _post_norm(card) or card.model_type in NORM_AFTER_SUBLAYER
