"""`peftplan advise`: the best configuration fits with the headroom and its micro-batch + 1 does not."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from peftplan.errors import PlanError
from peftplan.plan import Plan
from peftplan.planning import estimate
from peftplan.planning.advise import advise, axolotl_keys, training_arguments
from peftplan.planning.gpus import load_gpu


def test_llama_qlora_24gb_64x2048():
    """The acceptance case: llama-3.1-8b QLoRA on a 24 GB card, 64 sequences × 2048 tokens per step."""
    base = Plan(method="qlora", seq_len=2048, autocast="bf16")
    adv = advise("llama-3.1-8b", base, "rtx4090", 64, headroom=0.10)
    best = adv.best
    assert best is not None
    limit = 0.9 * load_gpu("rtx4090").usable_memory_bytes
    assert estimate("llama-3.1-8b", best.plan, gpu="rtx4090").peak_bytes <= limit
    bigger = best.plan.with_(batch_size=best.micro_batch + 1)
    assert estimate("llama-3.1-8b", bigger, gpu="rtx4090").peak_bytes > limit
    assert best.micro_batch * best.grad_accum >= 64 and best.micro_batch * (best.grad_accum - 1) < 64
    # every candidate fits and the table is ranked by predicted tokens/s
    assert all(c.peak_bytes <= c.limit_bytes for c in adv.candidates)
    rates = [c.tokens_per_s for c in adv.candidates]
    assert rates == sorted(rates, reverse=True)


def test_headroom_changes_the_answer():
    base = Plan(method="lora", seq_len=1024, autocast="bf16")
    loose = advise("llama-3.2-1b", base, "a10g", 32, headroom=0.0).best
    tight = advise("llama-3.2-1b", base, "a10g", 32, headroom=0.5).best
    assert loose.micro_batch > tight.micro_batch


def test_flash_not_searched_before_ampere():
    adv = advise("opt-1.3b", Plan(method="lora", seq_len=512, dtype="fp16", autocast="fp16"), "t4", 8)
    assert all(c.plan.attention != "flash" for c in adv.candidates)
    assert any("flash" in s for s in adv.skipped)


def test_nothing_fits():
    adv = advise("llama-3.1-70b", Plan(method="full", seq_len=2048), "rtx4090", 8)
    assert adv.best is None and adv.candidates == ()


def test_outputs_are_pasteable():
    adv = advise("llama-3.1-8b", Plan(method="qlora", seq_len=2048, autocast="bf16"), "a100-40gb", 16)
    ta, ax = training_arguments(adv.best), axolotl_keys(adv.best)
    assert f"per_device_train_batch_size={adv.best.micro_batch}," in ta and "bf16=True" in ta
    assert f"micro_batch_size: {adv.best.micro_batch}" in ax and "adapter: qlora" in ax and "load_in_4bit: true" in ax


@pytest.mark.parametrize("kwargs", [dict(global_batch=0), dict(global_batch=-3), dict(global_batch=8, headroom=1.5),
                                    dict(global_batch=8, optimizers=())])
def test_bad_input(kwargs):
    with pytest.raises(PlanError):
        advise("opt-125m", Plan(), "a100-80gb", **{"headroom": 0.1, **kwargs})


def test_cli_json_and_errors():
    run = lambda *a: subprocess.run([sys.executable, "-m", "peftplan", "advise", *a], capture_output=True, text=True)  # noqa
    ok = run("-m", "llama-3.1-8b", "--method", "qlora", "--gpu", "rtx4090", "--global-tokens", "131072", "--json")
    assert ok.returncode == 0, ok.stderr
    d = json.loads(ok.stdout)
    assert d["global_batch"] == 64 and d["best"]["micro_batch"] >= 1
    for bad in (["--global-batch", "0"], ["--global-batch", "4", "--global-tokens", "100"], ["--gpu", "nope",
                "--global-batch", "4"]):
        r = run(*bad)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
