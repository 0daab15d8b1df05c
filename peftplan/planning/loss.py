"""The causal-LM loss as older transformers releases compute it: terms the current loss does not have.

transformers 4.46–4.48 `loss/loss_utils.py::ForCausalLMLoss` (and the per-model `forward`s before 4.46) shift
the logits, not the labels:

    logits = logits.float()                              # b·s·V fp32
    shift_logits = logits[..., :-1, :].contiguous()      # b·(s−1)·V fp32: a copy
    loss = cross_entropy(shift_logits.view(-1, V), ...)  # log-softmax: b·(s−1)·V fp32

so during cross-entropy the fp32 logits, their shifted copy and the log-softmax are alive together. From 4.50
(`nn.functional.pad(labels, (0, 1), value=ignore_index)`, transformers PR 36607; PR 35646 first dropped the
`.contiguous()`) the labels are shifted instead and no copy is made. Neither the slice nor the copy is saved
for backward, so backward is unchanged: its largest moment stays log-softmax's backward (saved output, its
gradient, the input gradient); the slice's backward (a zero-filled b·s·V fp32 gradient beside the b·(s−1)·V one)
is smaller. Pure Python: no torch.
"""
from __future__ import annotations

from peftplan.planning.cards import ModelCard
from peftplan.plan import Plan

FP32 = 4


def shift_copy_bytes(card: ModelCard, plan: Plan) -> int:
    """Bytes of the contiguous fp32 shifted-logits copy, b·(s−1)·V·4, alive during the forward's loss
    (`plan.logits_shift_copy`: transformers ≤ 4.48). 0 for the current loss, for masked-LM encoders, whose
    loss has no shift, for encoder-decoders (T5's own CrossEntropyLoss on unshifted logits: the decoder inputs
    are shifted instead), and for one sequence per batch (its slice is contiguous already: no copy is made). Source: transformers 4.48.1 `loss/loss_utils.py::ForCausalLMLoss`."""
    if not plan.logits_shift_copy or card.encoder or card.cross_attention or plan.batch_size == 1:
        return 0  # b = 1: the (1, s−1, V) slice is already contiguous, and .contiguous() returns it
    return FP32 * plan.batch_size * (plan.seq_len - 1) * card.vocab_size


def shifted_rows_bytes(card: ModelCard, plan: Plan, tensors: int) -> int:
    """The old loss runs cross-entropy over b·(s−1) rows, not b·s: each of `tensors` fp32 (row × V) tensors it
    keeps (log-softmax; in backward also its gradient and the input gradient) is b·V·4 bytes smaller. Returned
    as a negative number of bytes; 0 where `shift_copy_bytes` does not apply for the loss (encoders, the current
    loss)."""
    if not plan.logits_shift_copy or card.encoder or card.cross_attention:
        return 0
    return -tensors * FP32 * plan.batch_size * card.vocab_size
