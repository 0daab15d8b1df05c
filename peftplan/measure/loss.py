"""transformers ≤ 4.48's causal-LM loss, for the trace of runs made with it (`Plan.logits_shift_copy`).

transformers 4.46–4.48 `loss/loss_utils.py::ForCausalLMLoss` shifted the fp32 logits with a contiguous copy;
transformers ≥ 4.50 pads and shifts the labels instead (no copy). `build_model` installs this function as the
model's `loss_function` (transformers 5's setter), so the model's own forward calls it where it calls the
current one, with the same arguments; the numbers are the same, the memory is the old release's.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F


def shifted_causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                           num_items_in_batch: torch.Tensor | int | None = None, ignore_index: int = -100,
                           **kwargs) -> torch.Tensor:
    """Mean (or, given num_items_in_batch, summed then divided) next-token cross-entropy.

    logits (b, s, V) in any float dtype, upcast to fp32; labels (b, s) token ids or ignore_index. The last
    position's logits and the first label are dropped by slicing, and the sliced logits are copied to a
    contiguous (b·(s−1), V) fp32 tensor, as transformers 4.48.1 does."""
    logits = logits.float()
    shifted = logits[..., :-1, :].contiguous().view(-1, vocab_size)
    targets = labels[..., 1:].contiguous().view(-1).to(shifted.device)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = F.cross_entropy(shifted, targets, ignore_index=ignore_index, reduction=reduction)
    return loss / num_items_in_batch if reduction == "sum" else loss
