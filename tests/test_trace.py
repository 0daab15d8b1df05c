"""The fake-tensor trace: equal to a real CPU run, and the analytic estimate held to it."""
import dataclasses
import json
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from peftplan.planning.cards import registry  # noqa: E402
from peftplan.planning import estimate  # noqa: E402
from peftplan.plan import Plan  # noqa: E402
from peftplan.trace.check import compare, summarize  # noqa: E402
from peftplan.trace.run import TraceError, trace  # noqa: E402

METHODS = ("full", "top", "adapter", "lora", "qlora")


def small(name: str, layers: int = 2):
    """A shipped card cut to a few blocks: same shapes per block, quick on the CPU."""
    return dataclasses.replace(registry()[name], n_layers=layers, name=f"{name}-{layers}L")


@pytest.mark.parametrize("method", METHODS)
def test_fake_trace_equals_real_cpu_run(method):
    card = small("opt-125m")
    plan = Plan(method=method, batch_size=1, seq_len=32, r=8, adapter_size=16)
    fake = trace(card, plan, fake=True)
    real = trace(card, plan, fake=False)
    assert [p.peak_bytes for p in fake.phases] == [p.peak_bytes for p in real.phases]
    assert fake.peak.by_category_bytes == real.peak.by_category_bytes


GRID = [
    (name, Plan(method=m, r=r, batch_size=b, seq_len=s, grad_checkpointing=gc, attention=attn, adapter_size=32))
    for name in ("opt-125m", "llama-3.2-1b", "qwen2.5-0.5b", "gpt2", "bert-base")
    for m in ("full", "adapter", "lora", "qlora")
    for (r, b, s, gc, attn) in ((8, 1, 128, False, "sdpa"), (16, 2, 64, True, "sdpa"), (8, 1, 64, False, "eager"))
]


@pytest.mark.parametrize("name, plan", GRID, ids=lambda x: x if isinstance(x, str) else
                         f"{x.method}-b{x.batch_size}s{x.seq_len}-{'gc' if x.grad_checkpointing else 'nogc'}-{x.attention}")
def test_estimate_within_2pct_of_trace(name, plan):
    card = small(name, layers=2)
    c = compare(estimate(card, plan), trace(card, plan))
    assert abs(c.peak_error) <= 0.02, (c.peak_error, c.trace_phase, c.estimate_phase)


LARGE = [("opt-6.7b", Plan(method="lora", batch_size=4, seq_len=512)),
         ("llama-3.1-8b", Plan(method="qlora", batch_size=2, seq_len=512, grad_checkpointing=True)),
         ("qwen2.5-7b", Plan(method="adapter", batch_size=1, seq_len=1024)),
         ("llama-2-7b", Plan(method="full", batch_size=1, seq_len=512, optimizer="adamw8bit")),
         ("gemma-2-2b", Plan(method="lora", batch_size=1, seq_len=512, attention="eager"))]


@pytest.mark.parametrize("name, plan", LARGE, ids=[n for n, _ in LARGE])
def test_full_size_estimate_within_2pct_of_trace(name, plan):
    card = registry()[name]
    c = compare(estimate(card, plan), trace(card, plan))
    assert abs(c.peak_error) <= 0.02, (c.peak_error, c.trace_phase)
    for field, err in c.component_errors.items():  # each component, as a share of the peak
        assert abs(err) <= 0.02, (field, err)


def test_summary_maths():
    class C:
        def __init__(self, e):
            self.peak_error = e
    s = summarize([C(x) for x in (0.01, -0.03, 0.0, 0.005)], ["x: failed"])
    assert s.n == 4 and s.max_abs_error == 0.03 and s.within_2pct == 3 and s.median_abs_error == 0.0075
    assert s.failures == ("x: failed",)


def test_failing_op_is_named_with_its_module(monkeypatch):
    import torch
    from transformers.models.opt import modeling_opt

    def bad_forward(self, hidden_states, *a, **k):
        return hidden_states * hidden_states.sum().item()  # data-dependent: cannot run on fake tensors

    monkeypatch.setattr(modeling_opt.OPTAttention, "forward", bad_forward)
    with pytest.raises(TraceError, match=r"forward at module '(base_model\.model\.)?model\.decoder\.layers\.0\.self_attn'"):
        trace(small("opt-125m"), Plan(method="lora", seq_len=16))
    assert torch  # the process survives: no abort


def test_trace_cli_json_and_bad_input():
    r = subprocess.run([sys.executable, "-m", "peftplan", "trace", "--model", "opt-125m", "--method", "lora",
                        "--seq-len", "64", "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["peak_bytes"] == max(p["peak_bytes"] for p in d["phases"])
    assert {p["phase"] for p in d["phases"]} == {"forward", "backward", "optimizer"}
    assert abs(d["comparison"]["peak_error"]) < 0.02
    r = subprocess.run([sys.executable, "-m", "peftplan", "trace", "--model", "nope"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown model" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name, attn", [("opt-6.7b", "sdpa"), ("llama-2-7b", "sdpa"), ("llama-3.1-8b", "sdpa"),
                                        ("qwen2.5-7b", "sdpa"), ("gemma-2-2b", "eager")])
@pytest.mark.parametrize("method", ("full", "adapter", "lora", "qlora"))
@pytest.mark.parametrize("gc", (False, True))
def test_full_size_cards_trace(name, attn, method, gc):
    card = registry()[name]
    plan = Plan(method=method, batch_size=1, seq_len=256, attention=attn, grad_checkpointing=gc)
    tr = trace(card, plan)
    assert tr.peak_bytes > 0 and {p.phase for p in tr.phases} == {"forward", "backward", "optimizer"}


def test_trace_title_says_when_the_card_is_cut():
    import os
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "peftplan", "trace", "-m", "opt-125m", "--n-layers", "1", "-b", "1",
                          "-s", "16"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert res.returncode == 0, res.stderr
    assert "trace: opt-125m (first 1 of 12 blocks) · lora" in res.stdout
