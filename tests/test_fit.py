"""The fit search: its answers sit exactly on the boundary of `Estimate.fits`, and bad input is a PlanError."""
import json

import pytest

from peftplan.planning.cards import load_card
from peftplan.errors import PlanError
from peftplan.planning import estimate
from peftplan.planning.fit import MAX_BATCH, fit_matrix, largest_batch, longest_seq, search_largest
from peftplan.planning.memory import phases
from peftplan.plan import Plan

HUGE = dict(model_type="llama", hidden_size=16384, num_hidden_layers=126, num_attention_heads=128,
            num_key_value_heads=8, intermediate_size=53248, vocab_size=128256, max_position_embeddings=8192,
            tie_word_embeddings=False)  # Llama-3.1-405B's shape: fits no single card


@pytest.fixture
def huge(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HUGE | {"_name_or_path": "huge-405b"}))
    return str(tmp_path / "config.json")


@pytest.mark.parametrize("answer", [0, 1, 2, 3, 7, 8, 9, 100, 1000, 4095, 4096, 65535, 65536, 10**6])
def test_search_finds_the_boundary_in_logarithmic_steps(answer):
    calls = []

    def fits(n):
        calls.append(n)
        return n <= answer

    assert search_largest(fits, MAX_BATCH) == min(answer, MAX_BATCH)
    assert len(calls) <= 2 * MAX_BATCH.bit_length() + 2
    assert all(1 <= n <= MAX_BATCH for n in calls)


def test_search_respects_small_caps():
    assert search_largest(lambda n: True, 100) == 100
    assert search_largest(lambda n: True, 1) == 1
    assert search_largest(lambda n: True, 0) == 0
    assert search_largest(lambda n: n <= 70, 100) == 70


CASES = [  # the T4 has no bf16: plans for it are fp16
    ("opt-6.7b", "lora", "t4"),
    ("opt-6.7b", "qlora", "rtx4090"),
    ("opt-6.7b", "full", "a100-80gb"),
    ("llama-3.1-8b", "full", "h100-sxm"),
    ("llama-3.1-8b", "qlora", "t4"),
    ("mistral-7b-v0.1", "adapter", "a100-40gb"),
    ("qwen2.5-7b", "lora", "rtx4090"),
    ("opt-125m", "full", "t4"),
]


def dtype(gpu: str) -> str:
    return "fp16" if gpu == "t4" else "bf16"


@pytest.mark.parametrize("model,method,gpu", CASES)
def test_largest_batch_fits_and_one_more_does_not(model, method, gpu):
    plan = Plan(method=method, seq_len=512, dtype=dtype(gpu))
    b = largest_batch(model, plan, gpu)
    if b == 0:
        assert estimate(model, plan.with_(batch_size=1), gpu=gpu).fits is False
        return
    assert estimate(model, plan.with_(batch_size=b), gpu=gpu).fits is True
    if b < MAX_BATCH:
        assert estimate(model, plan.with_(batch_size=b + 1), gpu=gpu).fits is False


@pytest.mark.parametrize("model,method,gpu", CASES)
def test_longest_seq_fits_and_one_more_does_not(model, method, gpu):
    plan = Plan(method=method, batch_size=1, dtype=dtype(gpu))
    s = longest_seq(model, plan, gpu)
    cap = load_card(model).max_positions
    if s == 0:
        assert estimate(model, plan.with_(seq_len=1), gpu=gpu).fits is False
        return
    assert estimate(model, plan.with_(seq_len=s), gpu=gpu).fits is True
    if s < cap:
        assert estimate(model, plan.with_(seq_len=s + 1), gpu=gpu).fits is False


@pytest.mark.parametrize("method", ["full", "top", "adapter", "lora", "qlora"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_peak_grows_with_batch_and_sequence(method, ckpt):
    """The search assumes the peak never shrinks as b or s grows; hold the estimate to it."""
    card = load_card("llama-3.1-8b")
    plan = Plan(method=method, grad_checkpointing=ckpt)
    peak = lambda p: max(m.device_bytes for m in phases(card, p))  # noqa: E731
    by_b = [peak(plan.with_(batch_size=b)) for b in range(1, 40)]
    by_s = [peak(plan.with_(seq_len=s)) for s in range(1, 9000, 97)]
    assert by_b == sorted(by_b) and by_s == sorted(by_s)


def test_matrix_cells_equal_the_single_searches():
    models, gpus, methods = ["opt-1.3b", "llama-3.1-8b"], ["rtx4090", "a100-40gb"], ["full", "lora", "qlora"]
    fm = fit_matrix(models, gpus, methods, seq_len=1024)
    assert len(fm.cells) == len(models) * len(gpus) * len(methods)
    for model in models:
        for method in methods:
            for gpu in gpus:
                c = fm.cell(model, gpu, method)
                assert (c.model, c.gpu, c.method) == (model, gpu, method)
                assert c.largest_batch == largest_batch(model, Plan(method=method, seq_len=1024), gpu)
                assert c.longest_seq == longest_seq(model, Plan(method=method, batch_size=1), gpu)
                assert c.fits == (c.largest_batch > 0)
    assert json.loads(json.dumps(fm.to_dict()))["cells"][0]["fits"] in (True, False)


def test_matrix_carries_the_base_plan():
    base = Plan(r=64, optimizer="sgd", dtype="fp16")
    fm = fit_matrix(["opt-6.7b"], ["rtx4090"], ["lora"], seq_len=512, base=base)
    b = fm.cells[0].largest_batch
    assert b == largest_batch("opt-6.7b", base.with_(method="lora", seq_len=512), "rtx4090")


def test_memory_fit_needs_no_time_estimate():
    """A T4 has no bf16 (the time estimate refuses it), but whether a bf16 plan fits is a memory question."""
    fm = fit_matrix(["opt-125m"], ["t4"], ["lora"], seq_len=512)
    assert fm.cells[0].largest_batch == largest_batch("opt-125m", Plan(method="lora"), "t4") > 0


def test_a_model_that_fits_nowhere_is_a_row_of_zeros_not_an_error(huge):
    fm = fit_matrix([huge], ["t4", "h100-sxm"], ["full", "qlora"], seq_len=512)
    assert fm.models == ("huge-405b",)
    assert fm.fits_nowhere("huge-405b")
    assert all(c.largest_batch == 0 and c.longest_seq == 0 and not c.fits for c in fm.cells)


@pytest.mark.parametrize("models,gpus,methods", [
    (["no-such-model"], ["t4"], ["lora"]),
    (["opt-125m"], ["no-such-gpu"], ["lora"]),
    (["opt-125m"], ["t4"], ["no-such-method"]),
])
def test_unknown_names_are_plan_errors(models, gpus, methods):
    with pytest.raises(PlanError):
        fit_matrix(models, gpus, methods, seq_len=512)


def test_bad_sequence_length_is_a_plan_error():
    with pytest.raises(PlanError):
        fit_matrix(["opt-125m"], ["t4"], ["lora"], seq_len=0)


def test_fit_cli_applies_grad_checkpointing_and_says_so():
    """`fit --grad-checkpointing` plans with checkpointing (it was dropped outside --cluster): QLoRA on a 24 GB
    card at s = 2048 holds a larger batch, as the estimate says, and the footnote names the shared plan."""
    import json
    import os
    import subprocess
    import sys

    from peftplan.planning import estimate

    def run(*extra):
        res = subprocess.run([sys.executable, "-m", "peftplan", "fit", "-m", "llama-3.1-8b", "--gpus", "rtx4090",
                              "--methods", "qlora", "-s", "2048", *extra], capture_output=True, text=True,
                             env={**os.environ, "COLUMNS": "200"})
        assert res.returncode == 0, res.stderr
        return res.stdout

    off, on = (json.loads(run("--json", *x)) for x in ((), ("--grad-checkpointing",)))
    b_off, b_on = off["cells"][0]["largest_batch"], on["cells"][0]["largest_batch"]
    assert on["base"]["grad_checkpointing"] and not off["base"]["grad_checkpointing"]
    assert b_on > b_off
    est = estimate("llama-3.1-8b", method="qlora", seq_len=2048, batch_size=b_on, grad_checkpointing=True,
                   gpu="rtx4090")
    assert est.fits
    assert "gradient checkpointing on" in run("--grad-checkpointing")
