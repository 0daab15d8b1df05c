"""The fp16 loss scaler the Trainer runs (`fp16=True`: accelerate's `torch.amp.GradScaler`), for the one step.

Order, as accelerate drives it inside the Trainer: `scaler.scale(loss).backward()` per micro-step;
`scaler.unscale_(optimizer)` before clipping (`Accelerator.clip_grad_norm_`); `scaler.step(optimizer)` then
`scaler.update()`. Its tensors (torch/amp/grad_scaler.py): `_scale` (fp32 scalar) and `_growth_tracker` (int32
scalar), made on the first `scale`; per step `inv_scale` (the scale's fp64 reciprocal, cast to fp32), `found_inf`
(fp32 scalar per device), the gradients unscaled in place by `_amp_foreach_non_finite_check_and_unscale_`
(which also writes found_inf), and `_amp_update_scale_` updating scale and tracker in place.

Under fake tensors `found_inf` has no value: `step` cannot read it (`.item()`), and the step is taken (the
steady state of a healthy run: a skipped step only happens after an overflow).
"""
from __future__ import annotations

import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensor

from peftplan.plan import Plan

_SCALERS: "weakref.WeakKeyDictionary[torch.optim.Optimizer, torch.amp.GradScaler]" = weakref.WeakKeyDictionary()


class StepScaler(torch.amp.GradScaler):
    """torch.amp.GradScaler, except that with fake tensors the inf check cannot be read and the step is taken."""

    def _maybe_opt_step(self, optimizer, optimizer_state, *args, **kwargs):
        if any(isinstance(v, FakeTensor) for v in optimizer_state["found_inf_per_device"].values()):
            return optimizer.step(*args, **kwargs)
        return super()._maybe_opt_step(optimizer, optimizer_state, *args, **kwargs)


def scaler_for(optimizer: torch.optim.Optimizer, plan: Plan, device: torch.device) -> StepScaler | None:
    """The optimizer's loss scaler under fp16 autocast (one per optimizer, kept across steps, as accelerate keeps
    one per run); None otherwise (bf16 and fp32 need none)."""
    if plan.autocast != "fp16":
        return None
    scaler = _SCALERS.get(optimizer)
    if scaler is None:
        scaler = _SCALERS[optimizer] = StepScaler(device=device.type)
    return scaler
