"""The layers alone: LoRA/QLoRA against the base and against peft's LoRA layer, merge, Houlsby adapters.

Tolerances, stated once:
    LoRA with B = 0               bitwise equal to the base
    ours vs peft, same weights    bitwise equal (forward and every gradient)
    merge() of a float base       max |merged − unmerged| ≤ 1e-5 (fp32 rounding of W0 + ΔW)
    merge() of an NF4 base        relative error ≤ 0.15 (one NF4 requantization; ~0.09 measured)
    fresh Adapter                 ‖Adapter(h) − h‖ / ‖h‖ ≤ 1e-2 (σ = 10⁻² bottleneck; ~2e-3 measured)
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from peftplan.errors import PlanError
from peftplan.layers import Adapter, AdapterAfter, LoRALinear, is_linear4bit
from peftplan.layers.adapter import INIT_STD, trunc_normal_
from peftplan.planning.params import adapter_params, lora_params

bnb = pytest.importorskip("bitsandbytes")
D_IN, D_OUT, R, ALPHA = 32, 48, 4, 8.0




def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def conv1d(d_in: int, d_out: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    c = Conv1D(d_out, d_in)
    nn.init.normal_(c.weight, std=0.02)
    nn.init.normal_(c.bias, std=0.02)
    return c


BASES = {"linear": lambda: nn.Linear(D_IN, D_OUT), "conv1d": lambda: conv1d(D_IN, D_OUT)}


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------- LoRA


@pytest.mark.parametrize("kind", [*BASES, "nf4"])
def test_zero_b_is_exactly_the_base(kind):
    base = BASES["linear" if kind == "nf4" else kind]()
    lora = LoRALinear(base, R, ALPHA, quantize_base=kind == "nf4")
    x = torch.randn(2, 5, D_IN)
    assert torch.count_nonzero(lora.lora_b.weight) == 0
    assert torch.equal(lora(x), lora.base(x))
    assert sum(p.numel() for p in (lora.lora_a.weight, lora.lora_b.weight)) == lora_params(D_IN, D_OUT, R)
    assert lora.lora_a.weight.shape == (R, D_IN) and lora.lora_b.weight.shape == (D_OUT, R)


def test_a_is_kaiming_uniform_like_peft():
    lora = LoRALinear(nn.Linear(256, 64), 8, 16.0)
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=√5): gain·√(3/fan_in) = 1/√fan_in
    assert lora.lora_a.weight.abs().max() <= bound
    assert lora.lora_a.weight.abs().max() > 0.9 * bound
    assert lora.scaling == 2.0


def _peft_twin(ours: LoRALinear, dropout: float, fan_in_fan_out: bool):
    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit
    from peft.tuners.lora.layer import Linear as PeftLinear

    config = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout, fan_in_fan_out=fan_in_fan_out)
    cls = PeftLinear4bit if ours.quantized else PeftLinear
    theirs = cls(ours.base, "default", config=config, r=R, lora_alpha=ALPHA)
    theirs.lora_A.to(ours.lora_a.weight.dtype)
    theirs.lora_B.to(ours.lora_b.weight.dtype)
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_a.weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_b.weight)
    return theirs


@pytest.mark.parametrize("kind,dropout,x_dtype", [
    ("linear", 0.0, torch.float32), ("linear", 0.1, torch.float32), ("conv1d", 0.0, torch.float32),
    ("nf4", 0.0, torch.float32), ("nf4", 0.0, torch.bfloat16),
])
def test_forward_and_backward_match_peft(kind, dropout, x_dtype):
    base = BASES["linear" if kind == "nf4" else kind]()
    ours = LoRALinear(base, R, ALPHA, dropout, quantize_base=kind == "nf4")
    with torch.no_grad():
        ours.lora_b.weight.normal_()  # B ≠ 0 so the LoRA path counts
    theirs = _peft_twin(ours, dropout, fan_in_fan_out=kind == "conv1d")
    x1 = torch.randn(3, 5, D_IN, dtype=x_dtype, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    torch.manual_seed(1)
    y1 = ours(x1)
    torch.manual_seed(1)  # same dropout mask
    y2 = theirs(x2)
    grad = torch.randn_like(y1)
    y1.backward(grad)
    y2.backward(grad)
    assert torch.equal(y1, y2)
    assert torch.equal(x1.grad, x2.grad)
    assert torch.equal(ours.lora_a.weight.grad, theirs.lora_A["default"].weight.grad)
    assert torch.equal(ours.lora_b.weight.grad, theirs.lora_B["default"].weight.grad)


@pytest.mark.parametrize("kind", BASES)
def test_merge_and_unmerge_float_base(kind):
    lora = LoRALinear(BASES[kind](), R, ALPHA)
    with torch.no_grad():
        lora.lora_b.weight.normal_(std=0.1)
    w0 = lora.base.weight.detach().clone()
    x = torch.randn(4, D_IN)
    with torch.no_grad():
        unmerged = lora(x)
        lora.merge()
        merged = lora(x)
        assert lora.merged and (merged - unmerged).abs().max() <= 1e-5
        lora.merge()  # idempotent
        assert (lora(x) - unmerged).abs().max() <= 1e-5
        lora.unmerge()
    assert not lora.merged
    assert (lora.base.weight - w0).abs().max() <= 1e-6


def test_merge_nf4_base_requantizes():
    base = nn.Linear(256, 128)
    nn.init.normal_(base.weight, std=0.02)
    lora = LoRALinear(base, 8, 16.0, quantize_base=True)
    with torch.no_grad():
        lora.lora_b.weight.normal_(std=0.02)
        x = torch.randn(4, 256)
        unmerged = lora(x)
        lora.merge()
        assert is_linear4bit(lora.base) and lora.base.weight.quant_state.quant_type == "nf4"
        assert rel(lora(x), unmerged) <= 0.15


@pytest.mark.parametrize("double_quant", [True, False])
def test_quantize_base_is_nf4_linear4bit(double_quant):
    base = nn.Linear(D_IN, D_OUT)
    w = base.weight.detach().clone()
    lora = LoRALinear(base, R, ALPHA, quantize_base=True, double_quant=double_quant)
    q = lora.base
    assert isinstance(q, bnb.nn.Linear4bit) and lora.quantized
    assert isinstance(q.weight, bnb.nn.Params4bit) and not q.weight.requires_grad
    state = q.weight.quant_state
    assert state.quant_type == "nf4" and state.blocksize == 64 and state.nested == double_quant
    assert q.compute_dtype == torch.bfloat16
    assert q.weight.numel() * 2 == D_IN * D_OUT  # two 4-bit codes per byte
    assert rel(bnb.functional.dequantize_4bit(q.weight.data, state), w) < 0.15
    assert lora.lora_a.weight.dtype == torch.float32  # a 4-bit base has no float dtype to follow


def test_only_lora_parameters_get_gradients():
    base = nn.Linear(D_IN, D_OUT)
    base.requires_grad_(False)
    lora = LoRALinear(base, R, ALPHA)
    lora(torch.randn(2, D_IN)).sum().backward()
    assert base.weight.grad is None and base.bias.grad is None
    assert lora.lora_a.weight.grad is not None and lora.lora_b.weight.grad is not None


@pytest.mark.parametrize("r", [0, 33])
def test_bad_rank_is_one_clear_error(r):
    with pytest.raises(PlanError, match=r"rank r = .* must be in \[1, 32\]") as e:
        LoRALinear(nn.Linear(D_IN, D_OUT), r, ALPHA)
    assert "\n" not in str(e.value)


def test_non_linear_base_is_refused():
    with pytest.raises(PlanError, match="Linear or Conv1D"):
        LoRALinear(nn.LayerNorm(D_IN), R, ALPHA)


def test_weight_property_reads_the_base():
    base = nn.Linear(D_IN, D_OUT)
    assert LoRALinear(base, R, ALPHA).weight is base.weight


# ---------------------------------------------------------------- adapters


def test_adapter_parameter_count():
    a = Adapter(64, 8)
    assert sum(p.numel() for p in a.parameters()) == adapter_params(64, 8)


def test_fresh_adapter_is_near_identity():
    a = Adapter(64, 8)
    h = torch.randn(4, 10, 64)
    assert rel(a(h), h) <= 1e-2
    with torch.no_grad():
        a.up.weight.zero_()
    assert torch.equal(a(h), h)  # biases start at zero too


def test_adapter_init_is_truncated_normal():
    a = Adapter(1024, 256)
    w = a.down.weight
    assert w.abs().max() <= 2 * INIT_STD
    # std of N(0, σ²) truncated at ±2σ is 0.8796σ
    assert abs(w.std().item() / (0.8796 * INIT_STD) - 1) < 0.02
    assert torch.count_nonzero(a.down.bias) == 0 and torch.count_nonzero(a.up.bias) == 0


def test_trunc_normal_runs_on_fake_tensors():
    with FakeTensorMode():
        t = trunc_normal_(torch.empty(16, 16), 0.01)
    assert isinstance(t, FakeTensor)


def test_adapter_after_wraps_the_sublayer_output():
    base, adapter = nn.Linear(D_IN, D_OUT), Adapter(D_OUT, 8)
    wrapped = AdapterAfter(base, adapter)
    x = torch.randn(3, D_IN)
    assert torch.equal(wrapped(x), adapter(base(x)))
    assert wrapped.weight is base.weight
    base.requires_grad_(False)
    wrapped(x).sum().backward()
    assert all(p.grad is not None for p in adapter.parameters())
    assert base.weight.grad is None
