"""The analytic memory model: exact static terms, phase logic and monotonicity."""
import pytest

from peftplan.planning.cards import registry
from peftplan.planning import estimate
from peftplan.planning.memory import optimizer_state_bytes, rounded
from peftplan.planning.params import count, qlora_weight_bytes
from peftplan.plan import Plan


def test_rounding_like_cuda_allocator():
    assert rounded(1) == 512 and rounded(512) == 512 and rounded(513) == 1024


def test_full_adamw_is_16_bytes_per_param_in_pure_bf16():
    card = registry()["opt-1.3b"]
    est = estimate(card, Plan(method="full"))
    opt = {m.phase: m for m in est.phases}["optimizer"]
    n = card and count(card, Plan(method="full")).trainable
    # weights 2 + grads 2 + m,v 4 + foreach temporary 2 = 10 B/param (+ rounding and fp32 step scalars)
    assert opt.tensor_bytes == pytest.approx(10 * n, rel=0.01)
    assert est.peak.phase == "optimizer"


def test_qlora_frozen_weights_are_nf4_plus_fp32_rest():
    card = registry()["llama-2-7b"]
    p = count(card, Plan(method="qlora"))
    est = estimate(card, Plan(method="qlora"))
    expected = qlora_weight_bytes(card) + 4 * (p.frozen - p.quantized)  # Llama has no biases
    assert est.phases[0].frozen_weights_bytes == expected
    no_prep = estimate(card, Plan(method="qlora", kbit_prep=False))
    assert no_prep.phases[0].frozen_weights_bytes == qlora_weight_bytes(card) + 2 * (p.frozen - p.quantized)


def test_8bit_adam_smaller_than_adamw():
    n = [4096 * 4096, 100]
    plan8 = Plan(optimizer="adamw8bit")
    assert optimizer_state_bytes(n, plan8) == 2 * (4096 * 4096 + rounded(4 * 65536)) + 2 * rounded(400)
    assert optimizer_state_bytes(n, Plan(optimizer="sgd")) == 0


@pytest.mark.parametrize("method", ["full", "adapter", "lora", "qlora"])
def test_memory_grows_with_batch_and_seq(method):
    card = registry()["llama-3.2-1b"]
    def fwd(**shape):
        return estimate(card, Plan(method=method, **shape)).phases[0].tensor_bytes  # the forward phase

    assert fwd(batch_size=1, seq_len=256) < fwd(batch_size=2, seq_len=256) < fwd(batch_size=2, seq_len=512)


def test_checkpointing_saves_activation_memory():
    card = registry()["opt-6.7b"]
    off = estimate(card, Plan(method="lora", batch_size=4, seq_len=512))
    on = estimate(card, Plan(method="lora", batch_size=4, seq_len=512, grad_checkpointing=True))
    assert on.peak.activations_bytes < off.peak.activations_bytes / 5


def test_fit_verdict():
    est = estimate("llama-2-70b", Plan(method="full"), gpu="h100-sxm")
    assert est.fits is False
    est = estimate("opt-125m", Plan(method="lora"), gpu="t4")
    assert est.fits is True
