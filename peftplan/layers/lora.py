"""LoRA (Hu et al. 2021, §4.1) and QLoRA (Dettmers et al. 2023, §3): one layer over a frozen base.

    h = W0·x + (α/r)·B·A·dropout(x)        A ∈ R^{r×d_in} (Kaiming-uniform, as peft), B ∈ R^{d_out×r} (zeros)

B = 0 at the start, so the wrapped model starts as the base model. QLoRA is the same layer whose base is a
bitsandbytes `Linear4bit` storing W0 in NF4 (4-bit NormalFloat, blocks of 64) with double quantization of the
absmax constants and a bf16 compute dtype: `LoRALinear(base, r, alpha, quantize_base=True)`.

The quantization helpers here also run under `torch._subclasses.fake_tensor.FakeTensorMode`, where bitsandbytes'
`Params4bit` cannot wrap a FakeTensor and its 8-bit dynamic code book (built with `.tolist()`) cannot be made:
the code book is built once outside the mode and converted, and the packed weight is a plain frozen Parameter
that carries the same `quant_state` attribute `Params4bit` would.
"""
from __future__ import annotations

import math
import sys
from functools import cache

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

from peftplan.errors import PlanError

NF4_BLOCK = 64  # weights per absmax (bitsandbytes' 4-bit blocksize; QLoRA §3)


# ---------------------------------------------------------------- base-layer shapes


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 `Conv1D`: a Linear whose weight is stored d_in×d_out (y = x·W + b)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def is_linear4bit(module: nn.Module) -> bool:
    """A bitsandbytes `Linear4bit`, without importing bitsandbytes (4 s) when nothing has."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def is_linear(module: nn.Module) -> bool:
    """What peft's LoRA wraps here: `nn.Linear` (and its `Linear4bit` subclass) or GPT-2's `Conv1D`."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a Linear, Linear4bit or Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return module.nx, module.nf
    raise PlanError(f"LoRA wraps a Linear or Conv1D, not a {type(module).__name__}")


# ---------------------------------------------------------------- NF4 storage (bitsandbytes)


@cache
def _real_dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code book (the second-level code of double quantization), real."""
    import bitsandbytes.functional as F

    with unset_fake_temporarily():
        return F.create_dynamic_map(signed=True)


def quantize_nf4(w: torch.Tensor, double_quant: bool = True):
    """`bitsandbytes.functional.quantize_4bit(w, blocksize=64, nf4)` -> (packed uint8 [(n+1)//2, 1], QuantState).

    Works on real and on fake tensors: under a FakeTensorMode bitsandbytes' cached dynamic map is swapped
    for a fake copy while quantizing, then restored.
    """
    import bitsandbytes.functional as F

    def run():
        return F.quantize_4bit(w, blocksize=NF4_BLOCK, compress_statistics=double_quant, quant_type="nf4")

    if not isinstance(w, FakeTensor) or not double_quant:
        return run()
    saved = F.name2qmap.get("dynamic")
    F.name2qmap["dynamic"] = w.fake_mode.from_tensor(_real_dynamic_map())
    try:
        return run()
    finally:
        if saved is None:
            F.name2qmap.pop("dynamic", None)
        else:
            F.name2qmap["dynamic"] = saved


def attach_nf4(module: nn.Module, w: torch.Tensor) -> None:
    """Quantize the float weight w (d_out×d_in) into `module` (a Linear4bit), as `Params4bit` would hold it."""
    import bitsandbytes as bnb

    double_quant = getattr(module.weight, "compress_statistics", True)
    packed, state = quantize_nf4(w, double_quant)
    meta = dict(blocksize=NF4_BLOCK, compress_statistics=double_quant, quant_type="nf4",
                quant_storage=torch.uint8, bnb_quantized=True)
    if isinstance(packed, FakeTensor):  # Params4bit cannot wrap a FakeTensor: same attributes on a plain one
        weight = nn.Parameter(packed, requires_grad=False)
        for k, v in meta.items():
            setattr(weight, k, v)
        weight.quant_state = state
        weight.module = module
    else:
        weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, module=module, **meta)
    module.weight = weight
    module.quant_state = state


def to_linear4bit(linear: nn.Module, *, double_quant: bool = True,
                  compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A bitsandbytes NF4 `Linear4bit` with the shape and bias of `linear` (nn.Linear or Conv1D).

    The bias Parameter is kept as is. A real weight is quantized now; a meta weight stays a meta placeholder
    (same shape, dtype and quantization settings) that `peftplan.measure.step.materialize` quantizes.
    """
    import bitsandbytes as bnb

    d_in, d_out = in_out_features(linear)
    w = linear.weight
    with unset_fake_temporarily():  # Params4bit cannot wrap a fake tensor, not even a meta one
        q = bnb.nn.Linear4bit(d_in, d_out, bias=False, compute_dtype=compute_dtype,
                              compress_statistics=double_quant, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(torch.empty(d_out, d_in, dtype=w.dtype, device="meta"), requires_grad=False,
                                     blocksize=NF4_BLOCK, compress_statistics=double_quant, quant_type="nf4",
                                     module=q)
    q.bias = linear.bias
    if w.device.type != "meta":
        with torch.no_grad():
            attach_nf4(q, (w.t() if is_conv1d(linear) else w).detach().contiguous())
    return q


def dequantize_nf4(module: nn.Module) -> torch.Tensor:
    """The Linear4bit's weight W0 (d_out×d_in) in its original dtype."""
    import bitsandbytes.functional as F

    return F.dequantize_4bit(module.weight.data, module.weight.quant_state)


# ---------------------------------------------------------------- the layer


class LoRALinear(nn.Module):
    """h = W0·x + (α/r)·B·A·dropout(x) over a frozen base Linear, GPT-2 Conv1D or NF4 Linear4bit.

    LoRA: Hu et al. 2021, https://arxiv.org/abs/2106.09685 §4.1; QLoRA: Dettmers et al. 2023,
    https://arxiv.org/abs/2305.14314. A is r×d_in, initialised Kaiming-uniform (a = √5, as peft), B is d_out×r,
    zeros. As peft 0.21 (tuners/lora/layer.py `Linear.forward`): x is cast to the adapter's dtype (a copy per
    module when they differ), the LoRA term is added to the base output and the sum cast back to its dtype.

    Args:
        base: the frozen layer (kept as the child `base`).
        r: rank, at most min(d_in, d_out).
        alpha: scaling numerator; the update is scaled by α/r.
        dropout: dropout probability on the LoRA path's input (0: none, no copy of x).
        quantize_base: replace a float base by a bitsandbytes NF4 `Linear4bit` first (QLoRA).
        double_quant: NF4 with double quantization of the absmax constants (QLoRA §3).
        compute_dtype: the 4-bit base's compute dtype.
        dtype: dtype of A and B (default float32, as peft's `autocast_adapter_dtype=True` leaves them).

    Raises:
        PlanError: r not in [1, min(d_in, d_out)], or a base that is not a Linear/Conv1D.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, *,
                 quantize_base: bool = False, double_quant: bool = True,
                 compute_dtype: torch.dtype = torch.bfloat16, dtype: torch.dtype | None = None):
        super().__init__()
        d_in, d_out = in_out_features(base)
        if not 0 < r <= min(d_in, d_out):
            raise PlanError(f"LoRA rank r = {r} must be in [1, {min(d_in, d_out)}] for a {d_in}×{d_out} matrix")
        if quantize_base and not is_linear4bit(base):
            base = to_linear4bit(base, double_quant=double_quant, compute_dtype=compute_dtype)
        w = base.weight
        if dtype is None:  # peft's get_peft_model(autocast_adapter_dtype=True): bf16/fp16 adapters upcast to fp32
            dtype = torch.float32
        self.base = base
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.lora_a = nn.Linear(d_in, r, bias=False, device=w.device, dtype=dtype)
        self.lora_b = nn.Linear(r, d_out, bias=False, device=w.device, dtype=dtype)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters()

    @property
    def quantized(self) -> bool:
        return is_linear4bit(self.base)

    @property
    def weight(self) -> torch.Tensor:  # model code that reads `proj.weight` sees the base's, as with peft
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """A ~ Kaiming-uniform(a = √5) (peft's default), B = 0: the update B·A starts at exactly zero."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5), generator=generator)
            nn.init.zeros_(self.lora_b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        lora = self.lora_b(self.lora_a(self.dropout(x.to(self.lora_a.weight.dtype)))) * self.scaling
        if self.quantized:
            # peft's lora.bnb.Linear4bit.forward: the base output cloned ("defensively"), the LoRA term cast to
            # its dtype before the add
            return out.clone() + lora.to(out.dtype)
        # peft's lora.Linear.forward: the LoRA term added to the base output (type promotion: a fp32 sum over
        # a bf16 base), the sum cast back to the base output's dtype
        return (out + lora).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (α/r)·B·A, d_out×d_in."""
        return (self.lora_b.weight @ self.lora_a.weight) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """W0 ← W0 + ΔW; the forward is then the base alone. A 4-bit base is dequantized and requantized (lossy)."""
        if not self.merged:
            self._add_to_base(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 ← W0 − ΔW (exact up to rounding; requantized for a 4-bit base)."""
        if self.merged:
            self._add_to_base(-self.delta_weight())
            self.merged = False

    def _add_to_base(self, delta: torch.Tensor) -> None:
        if self.quantized:
            w = dequantize_nf4(self.base)
            attach_nf4(self.base, (w.float() + delta.float()).to(w.dtype))
            return
        w = self.base.weight
        w.add_((delta.t() if is_conv1d(self.base) else delta).to(w.dtype))

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, quantized={self.quantized}"
