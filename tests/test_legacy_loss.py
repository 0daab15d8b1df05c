"""transformers <= 4.48's causal-LM loss (`Plan.logits_shift_copy`): the shifted logits' fp32 copy, held to the
trace running that loss, and the published rows it explains (benchmarks/published.py)."""
import dataclasses
import json
import sys
from pathlib import Path

import pytest

from peftplan.plan import Plan
from peftplan.planning import estimate
from peftplan.planning.cards import registry
from peftplan.planning.loss import shift_copy_bytes


def small(name: str, layers: int = 1):
    return dataclasses.replace(registry()[name], n_layers=layers, name=f"{name}-{layers}L")


def test_the_copy_is_b_s_minus_1_v_fp32_in_forward_only():
    card, plan = registry()["mistral-7b-v0.1"], Plan(method="lora", batch_size=4, seq_len=4096)
    old = plan.with_(logits_shift_copy=True)
    copy = 4 * 4 * 4095 * 32_000
    assert shift_copy_bytes(card, old) == copy and shift_copy_bytes(card, plan) == 0
    new_f, new_b, _ = estimate(card, plan).phases
    old_f, old_b, _ = estimate(card, old).phases
    row = 4 * 4 * 32_000  # cross-entropy runs over b·(s−1) rows: one row per sequence less per fp32 tensor
    assert old_f.logits_bytes - new_f.logits_bytes == copy - row  # (log-softmax)
    # neither the slice nor the copy is saved for backward (log-softmax, its gradient, the input gradient)
    assert old_b.logits_bytes - new_b.logits_bytes == -3 * row
    assert shift_copy_bytes(registry()["bert-base"], Plan(method="full", logits_shift_copy=True)) == 0
    assert shift_copy_bytes(card, old.with_(batch_size=1)) == 0  # a batch-1 slice is contiguous: no copy


@pytest.mark.parametrize("name,plan", [
    ("opt-125m", Plan(method="lora", batch_size=2, seq_len=64, logits_shift_copy=True)),
    ("gpt2", Plan(method="lora", batch_size=1, seq_len=64, dtype="fp16", logits_shift_copy=True)),
    ("llama-3.2-1b", Plan(method="qlora", batch_size=2, seq_len=64, autocast="bf16", grad_checkpointing=True,
                          kbit_prep=False, logits_shift_copy=True)),
])
def test_estimate_within_2pct_of_the_trace_running_the_old_loss(name, plan):
    pytest.importorskip("torch")
    from peftplan.trace.check import compare
    from peftplan.trace.run import trace

    card = small(name)
    old, new = trace(card, plan), trace(card, plan.with_(logits_shift_copy=False))
    c = compare(estimate(card, plan), old)
    assert abs(c.peak_error) <= 0.02, c
    # the trace's own forward peak (at the loss) grows by the copy, independently of the estimate
    old_fwd, new_fwd = (next(p.peak_bytes for p in t.phases if p.phase == "forward") for t in (old, new))
    grow = old_fwd - new_fwd
    from peftplan.planning.loss import shifted_rows_bytes

    expected = shift_copy_bytes(card, plan) + shifted_rows_bytes(card, plan, 1)
    assert abs(grow - expected) <= 0.02 * abs(expected)


def test_old_loss_equals_the_current_one():
    torch = pytest.importorskip("torch")
    from transformers.loss.loss_utils import ForCausalLMLoss

    from peftplan.measure.loss import shifted_causal_lm_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 9, 11, generator=g, dtype=torch.bfloat16)
    labels = torch.randint(0, 11, (2, 9), generator=g)
    labels[0, 3] = -100
    for n in (None, torch.tensor(7)):
        assert torch.allclose(shifted_causal_lm_loss(logits, labels, 11, num_items_in_batch=n),
                              ForCausalLMLoss(logits, labels, 11, num_items_in_batch=n))


sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import published  # noqa: E402

ROWS = [json.loads(x) for x in published.JSONL.read_text().splitlines() if x.strip()] \
    if published.JSONL.exists() else []


@pytest.mark.skipif(not ROWS, reason="../shared/published/measurements.jsonl is not here")
def test_transformers_rows_median_3pct_max_8pct():
    rows = [published.compare_row(r) for r in ROWS]
    fms = next(r for r in ROWS if r["id"] == "fms_mistral7b_lora_bs4")
    assert published.plan_for_row(fms)[1].logits_shift_copy  # transformers 4.48.1
    s = published.summary(rows)["transformers"]
    assert s["n"] >= 5 and s["median_abs_error"] <= 0.03 and s["max_abs_error"] <= 0.08, s
