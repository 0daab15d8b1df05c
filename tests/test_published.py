"""benchmarks/published.py: published rows mapped to plans (the mapping the throughput comparison reuses)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import published  # noqa: E402

ROWS = [json.loads(x) for x in published.JSONL.read_text().splitlines() if x.strip()] \
    if published.JSONL.exists() else []
pytestmark = pytest.mark.skipif(not ROWS, reason="../shared/published/measurements.jsonl is not here")


def row(rid: str) -> dict:
    return next(r for r in ROWS if r["id"] == rid)


def test_fms_rows_map_to_the_stack_they_ran():
    card, plan = published.plan_for_row(row("fms_mistral7b_lora_bs4"))
    assert card == "mistral-7b-v0.1"
    assert (plan.method, plan.r, plan.adapter_dtype) == ("lora", 16, "fp32")
    assert plan.targets == "q_proj,k_proj,v_proj,o_proj"
    assert (plan.batch_size, plan.seq_len, plan.attention, plan.grad_checkpointing) == (4, 4096, "flash", True)
    assert plan.dropout == 0.1 and plan.autocast == "none"
    _, q = published.plan_for_row(row("fms_mistral7b_qlora_bs4"))
    assert q.method == "qlora" and q.autocast == "bf16" and q.kbit_prep and q.double_quant
    _, plugin = published.plan_for_row(row("fms_mistral7b_qlora_fmsplugin_bs4"))
    assert not plugin.kbit_prep


def test_every_row_is_a_plan_or_a_reason():
    for r in ROWS:
        got = published.plan_for_row(r)
        assert isinstance(got, str) and got.startswith("cannot be expressed") or isinstance(got, tuple), r["id"]
    assert "no card" in published.plan_for_row(row("qwen_7b_chat_lora_r64_all_L256"))
    assert published.stack_of(row("litgpt_rt_llama2_7b_lora_mbs1")) == "litgpt"


def test_full_fine_tuning_row_within_1pct():
    # the optimizer-step peak of pure bf16 full fine-tuning: weights + grads + AdamW states + foreach temporary
    out = published.compare_row(row("fms_mistral7b_full_bs4"))
    assert out["metric"] == "tensor" and abs(out["error"]) < 0.01
