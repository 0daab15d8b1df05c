"""Count a built model's parameters and the bytes it stores: one function for every path.

bitsandbytes packs two 4-bit codes per uint8, so a `Params4bit` of n weights has n/2 elements; like peft
(`get_nb_trainable_parameters`) it is counted as numel·2 parameters. Its bytes are the packed weight plus every
tensor of its QuantState: absmax (uint8 with double quantization, else fp32), and with double quantization the
nested absmax (fp32), the nested 8-bit code book (fp32, 256 entries), the offset (fp32 scalar); always the NF4
code book (fp32, 16 entries). Each tensor holds its own copy of the code books (bitsandbytes copies them per
weight), which `params.nf4_bytes` assumes; storages are still de-duplicated here in case a version shares them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelCount:
    total: int  # parameters, tied ones once, a 4-bit weight as its unpacked element count
    trainable: int
    stored_bytes: int  # unique storages of all parameters and of every 4-bit quant-state tensor
    buffer_bytes: int  # unique storages of buffers (rotary frequencies, position ids), not in stored_bytes


def quant_state_tensors(state) -> list[torch.Tensor]:
    """Every tensor a bitsandbytes QuantState holds, nested state included."""
    out = [t for t in (getattr(state, k, None) for k in ("absmax", "code", "offset")) if isinstance(t, torch.Tensor)]
    nested = getattr(state, "state2", None)
    return out + (quant_state_tensors(nested) if nested is not None else [])


def is_4bit(p: torch.Tensor) -> bool:
    """A packed 4-bit weight: a quantized bitsandbytes Params4bit, or the fake-tensor stand-in with its quant_state.

    (A Params4bit not yet quantized, like the meta placeholder before materialization, holds the full float shape.)
    """
    return getattr(p, "quant_state", None) is not None


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def count_model(model: nn.Module) -> ModelCount:
    """Total and trainable parameters and stored bytes, each storage counted once."""
    total = trainable = 0
    seen: dict[int, int] = {}
    for p in model.parameters():  # de-duplicates tied parameters
        n = p.numel() * 2 * p.element_size() if is_4bit(p) else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
        seen.setdefault(_storage_key(p), p.untyped_storage().nbytes())
        state = getattr(p, "quant_state", None)
        for t in quant_state_tensors(state) if state is not None else ():
            seen.setdefault(_storage_key(t), t.untyped_storage().nbytes())
    buffers: dict[int, int] = {}
    for b in model.buffers():
        buffers.setdefault(_storage_key(b), b.untyped_storage().nbytes())
    return ModelCount(total=total, trainable=trainable, stored_bytes=sum(seen.values()),
                      buffer_bytes=sum(buffers.values()))
