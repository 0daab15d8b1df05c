"""The Trainer's autocast (`bf16=True` / `fp16=True`) around forward and loss, with CUDA's op policy everywhere.

On a GPU this is `torch.autocast("cuda", dtype)`. On the CPU (the fake-tensor trace) torch's own CPU autocast
has other op lists (torch's aten/src/ATen/autocast_mode.h: CPU keeps fewer ops in fp32 and more in lower
precision), so `CudaAutocast` applies CUDA's lists itself, as a TorchFunctionMode above autograd: its casts are
recorded by autograd exactly as autocast's are, and copies of leaf tensors that require grad (weights) are
cached for the region, as autocast's cast cache does.

CUDA's lists (torch docs, "Autocast Op Reference", CUDA ops that autocast to float16/bfloat16 and to float32):
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

# ops that run in the lower-precision dtype (every floating input cast to it)
LOWER = frozenset({
    "linear", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "addbmm", "baddbmm", "addmv", "addr",
    "mv", "einsum", "chain_matmul", "multi_dot", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
    "conv_transpose2d", "conv_transpose3d", "prelu", "scaled_dot_product_attention",
})
# ops that run in fp32 (every lower-precision floating input cast up)
FP32 = frozenset({
    "pow", "__pow__", "__rpow__", "__rdiv__", "__rtruediv__", "acos", "asin", "cosh", "erfinv", "exp", "expm1",
    "log", "log10", "log2", "log1p", "reciprocal", "rsqrt", "sinh", "tan", "softplus", "layer_norm", "group_norm",
    "norm", "normalize", "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss",
    "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss",
    "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss",
    "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp", "prod", "cumprod",
    "cumsum", "softmax", "log_softmax", "sum", "cross_entropy",
})
HALF = (torch.float16, torch.bfloat16)


class CudaAutocast(TorchFunctionMode):
    """CUDA autocast's policy for ops called from Python, on any device (see the module docstring)."""

    def __init__(self, dtype: torch.dtype, cache: bool = True):
        super().__init__()
        self.dtype = dtype
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = {} if cache else None

    def _cast(self, x, to: torch.dtype):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype in (to, torch.float64):
            return x
        if to == torch.float32 and x.dtype not in HALF:
            return x
        # autocast's cache: fp32 leaves that require grad (weights) cast down to the autocast dtype, once; never
        # an up-cast to fp32 (a bf16 embedding output made a leaf by enable_input_require_grads, read by
        # layer_norm), never a view (torch aten/src/ATen/autocast_mode.cpp, cached_cast's can_try_cache)
        if (self.cache is not None and to == self.dtype and x.dtype == torch.float32 and x.is_leaf
                and x.requires_grad and not x._is_view()):
            hit = self.cache.get(id(x))
            if hit is None or hit[0] is not x:
                hit = self.cache[id(x)] = (x, x.to(to))
            return hit[1]
        return x.to(to)

    def _cast_all(self, obj, to):
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._cast_all(o, to) for o in obj)
        return self._cast(obj, to)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if kwargs.get("dtype") is None:  # ops given an explicit dtype are not eligible
            if name in LOWER:
                args, kwargs = self._cast_all(args, self.dtype), {k: self._cast_all(v, self.dtype)
                                                                   for k, v in kwargs.items()}
            elif name in FP32:
                args = self._cast_all(args, torch.float32)
                kwargs = {k: self._cast_all(v, torch.float32) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def recompute_autocast(autocast: str, device):
    """A context factory for checkpointed blocks' recomputation in backward, or None where none is needed.

    torch.utils.checkpoint re-enters the forward's torch.autocast state for the recompute by itself; the CPU
    emulation must be entered there explicitly (non-reentrant checkpoint's `context_fn`). Without a cache: a
    recompute's copies serve that block only and are freed with its backward.
    """
    if autocast == "none" or torch.device(device).type == "cuda":
        return None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[autocast]
    return lambda: _emulating(CudaAutocast(dtype, cache=False))


@contextlib.contextmanager
def _emulating(mode: CudaAutocast):
    saved = torch.is_autocast_enabled

    def enabled(device_type: str | None = None) -> bool:  # CUDA's answer; the CPU's own state stays as it is
        return True if device_type in (None, "cuda") else saved(device_type)

    torch.is_autocast_enabled = enabled
    try:
        with mode:
            yield
    finally:
        torch.is_autocast_enabled = saved


@contextlib.contextmanager
def trainer_autocast(autocast: str, device):
    """torch.autocast("cuda", dtype) on CUDA, `CudaAutocast` elsewhere; nothing for autocast == "none".

    While the emulation runs, `torch.is_autocast_enabled()` answers True, as code that branches on it (peft's
    4-bit LoRA skips its own dtype conversion under autocast) reads it on a GPU.
    """
    if autocast == "none":
        yield
        return
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[autocast]
    if torch.device(device).type == "cuda":
        with torch.autocast("cuda", dtype=dtype):
            yield
        return
    with _emulating(CudaAutocast(dtype)):
        yield
