"""Encoder–decoder (Flan-T5) memory held to the fake-tensor trace (peftplan/planning/seq2seq.py), and QLoRA
leaving T5's `wo` unquantized as transformers' 4-bit load does."""
from __future__ import annotations

import pytest

from peftplan.plan import Plan
from peftplan.planning import estimate
from peftplan.planning.cards import registry
from peftplan.planning.params import quantizable
from peftplan.trace.check import compare
from peftplan.trace.random_check import cut
from peftplan.trace.run import trace


SLOW = pytest.mark.slow


@pytest.mark.parametrize("options", [
    dict(method="lora"),  # peft's default targets q, v: fp32 input copies in both stacks, cross-attention's v on E
    dict(method="full"),  # trained position bias (memory-efficient kernel), the tied embedding's summed gradient
    pytest.param(dict(method="adapter"), marks=SLOW),  # adapters in the decoder, every norm trains
    dict(method="qlora", targets="all-linear"),  # wo stays unquantized (fp32 after k-bit preparation)
    dict(method="lora", grad_checkpointing=True),  # embeddings, encoder output, biases held by the checkpoints
    pytest.param(dict(method="lora", attention="eager"), marks=SLOW),  # probabilities, attention dropout
    dict(method="lora", dtype="fp32", autocast="bf16"),  # fp32 stream, gelu_new's fp32 pow, weight copies
])
def test_t5_one_block_within_half_a_percent(options):
    """A 1-block cut (the whole encoder, one decoder block) against the trace: these were -10% to -43% before
    the encoder stack, cross-attention, position-bias masks, dropout masks and the un-upcast loss were modelled."""
    card = cut(registry()["flan-t5-base"], 1)
    plan = Plan(batch_size=2, seq_len=32, **options)
    est = estimate(card, plan)
    assert not [w for w in est.warnings if "approximate" in w]
    c = compare(est, trace(card, plan))
    assert abs(c.peak_error) <= 0.005, c.peak_error


def test_t5_wo_not_quantized_like_a_4bit_load():
    """transformers' bitsandbytes quantizer skips `_keep_in_fp32_modules` (T5: wo): neither the estimate nor the
    trace quantizes it, and the trace's model is built that way."""
    import torch  # noqa: F401  (the trace tier)

    from peftplan.inject import kept_in_fp32
    from peftplan.measure.step import build_model

    card = cut(registry()["flan-t5-base"], 1)
    names = {lin.name.rsplit(".", 1)[-1] for lin, _ in quantizable(card)}
    assert "wo" not in names and {"q", "wi_0", "o"} <= names
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        model, _ = build_model(card, Plan(method="qlora", batch_size=1, seq_len=8), "cpu", impl="peft")
    linears = {n: m for n, m in model.named_modules() if n.endswith((".wo", ".wi_0", ".wo.base_layer"))}
    assert any(kept_in_fp32(model, n) for n in linears)
    for n, m in linears.items():
        assert ("Linear4bit" in type(m).__name__) == (not kept_in_fp32(model, n)), n


def test_t5_with_dora_says_it_is_approximate():
    """DoRA on T5's encoder is not modelled: said; autocast, eager attention and checkpointing are held to the
    trace, so not."""
    card = registry()["flan-t5-base"]
    said = estimate(card, Plan(method="lora", use_dora=True, batch_size=1, seq_len=64)).warnings
    assert any("approximate" in w and "DoRA" in w for w in said)
    for plan in (Plan(method="lora", dtype="fp32", autocast="bf16", batch_size=1, seq_len=64),
                 Plan(method="full", attention="eager", grad_checkpointing=True, batch_size=1, seq_len=64)):
        assert not [w for w in estimate(card, plan).warnings if "approximate" in w]


def test_random_draw_takes_t5_without_dora():
    import random

    from peftplan.trace.random_check import draw_plan, families

    assert "t5" in families()
    card = cut(registry()["flan-t5-base"], 1)
    rng = random.Random(3)
    assert not any(draw_plan(rng, card).use_dora for _ in range(40))
