"""fp16 autocast's loss scaler (the Trainer's `fp16=True`: accelerate's `torch.amp.GradScaler`), in bytes.

torch/amp/grad_scaler.py: `_scale` (fp32 scalar) and `_growth_tracker` (int32 scalar) live from the first
`scale(loss)` on; `scale(loss)` makes the scaled loss (a scalar) that backward starts from; `unscale_` makes
`inv_scale` (the fp64 reciprocal of the scale cast to fp32, freed when it returns) and `found_inf` (fp32 scalar
per device, kept in the optimizer's scaler state until `update`), and unscales every gradient in place with
`_amp_foreach_non_finite_check_and_unscale_` (a multi-tensor kernel on CUDA: no temporaries); `update` updates
scale and tracker in place (`_amp_update_scale_`). Each scalar takes one 512-byte allocator block. GradScaler
refuses fp16 gradients ("Attempting to unscale FP16 gradients."): validate.py rejects such plans.
Pure Python: no torch.
"""
from __future__ import annotations

from dataclasses import replace

from peftplan.plan import Plan

BLOCK = 512  # one scalar: one caching-allocator block


def scaler_bytes(plan: Plan, phase: str) -> int:
    """Live GradScaler bytes at a phase's peak: scale and growth tracker (forward), + the scaled loss
    (backward), + found_inf (optimizer step). 0 without fp16 autocast."""
    if plan.autocast != "fp16":
        return 0
    return BLOCK * {"forward": 2, "backward": 3, "optimizer": 3}[phase]


def with_scaler(plan: Plan, phases: tuple) -> tuple:
    """The phases' Memory with the scaler's bytes added to their temporaries."""
    if plan.autocast != "fp16":
        return phases
    return tuple(replace(m, temporaries_bytes=m.temporaries_bytes + scaler_bytes(plan, m.phase)) for m in phases)
