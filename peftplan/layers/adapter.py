"""Houlsby bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", §2.1).

    Adapter(h) = h + W_up·f(W_down·h + b_down) + b_up        W_down ∈ R^{m×d}, W_up ∈ R^{d×m}

2md + d + m parameters per adapter. Houlsby place one after the attention output projection and one after the
FFN output projection of every block, before the residual add, and train the layer norms with them.
"""
from __future__ import annotations

import math

import torch
from torch import nn

INIT_STD = 1e-2  # Houlsby §3.6: zero-mean Gaussian, σ = 10⁻², truncated at two standard deviations

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


def trunc_normal_(t: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """N(0, σ²) truncated to [−2σ, 2σ] by inverse CDF: x = σ·√2·erfinv(u), u ~ U(−p, p), p = erf(√2).

    In-place ops only (torch's trunc_normal_ rejects samples with .item(), which fake tensors cannot run).
    """
    p = math.erf(2 / math.sqrt(2))  # 2Φ(2) − 1: the mass within two standard deviations, mapped to (−1, 1)
    return t.uniform_(-p, p, generator=generator).erfinv_().mul_(std * math.sqrt(2)).clamp_(-2 * std, 2 * std)


class Adapter(nn.Module):
    """Adapter(h) = h + W_up·f(W_down·h + b_down) + b_up: the bottleneck d → m → d with a skip connection.

    Houlsby et al. 2019, https://arxiv.org/abs/1902.00751 §2.1. Both projections start from N(0, σ = 10⁻²)
    truncated at 2σ with zero biases, so |Adapter(h) − h| ≤ |W_up|·|f(W_down·h)| is small and the adapted model
    starts close to the base model (exactly the base only if W_up were zero, which would stall W_down's gradient).

    Raises:
        KeyError: an activation not in ACTIVATIONS.
    """

    def __init__(self, d: int, m: int, activation: str = "gelu", *, device=None, dtype=None):
        super().__init__()
        self.d, self.m = d, m
        self.down = nn.Linear(d, m, device=device, dtype=dtype)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(m, d, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            for lin in (self.down, self.up):
                trunc_normal_(lin.weight, INIT_STD, generator)
                nn.init.zeros_(lin.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))

    def extra_repr(self) -> str:
        return f"d={self.d}, m={self.m}"


class AdapterAfter(nn.Module):
    """y = Adapter(base(x)): an adapter on a sublayer's output projection, before the block's residual add.

    Wrapping the output projection (o_proj, out_proj, c_proj, fc2, down_proj, attention.output.dense, ...) puts
    the adapter exactly where Houlsby do in every family, whatever the block's own forward looks like.
    """

    def __init__(self, base: nn.Module, adapter: Adapter):
        super().__init__()
        self.base = base
        self.adapter = adapter

    @property
    def weight(self) -> torch.Tensor:  # model code that reads `proj.weight` sees the base's
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.adapter(self.base(*args, **kwargs))
