"""DoRA (peft's use_dora) in the estimate: magnitude vectors, saved tensors and the weight-norm working set
(planning/dora.py), held to peft's own counts and to the trace of peft's DoRA step."""
import dataclasses

import pytest

from peftplan.cli import run_app
from peftplan.plan import Plan
from peftplan.planning import estimate
from peftplan.planning.cards import registry
from peftplan.planning.dora import magnitudes, transient_bytes


def small(name: str, layers: int = 2):
    return dataclasses.replace(registry()[name], n_layers=layers, name=f"{name}-{layers}L")


@pytest.mark.parametrize("name,targets", [("opt-125m", None), ("llama-3.2-1b", "all-linear")])
def test_trainable_count_is_peft_s(name, targets):
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from peftplan.inject import inject_peft
    from peftplan.measure.step import step_config

    card, plan = small(name), Plan(method="lora", targets=targets, use_dora=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(step_config(card, plan))
    peft_model, _ = inject_peft(model, card, plan)
    theirs = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    mags = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_magnitude_vector" in n)
    assert estimate(card, plan).params.trainable == theirs
    assert sum(magnitudes(card, plan)) == mags > 0
    assert estimate(card, plan.with_(use_dora=False)).params.trainable == theirs - mags


def test_weight_norm_working_set_of_one_module():
    # q_proj of Llama-3.2-1B (2048 -> 2048), fp32 adapters over bf16: eye, A·eye, lora_weight, the fp32 copy of
    # the weight, scaling·lora_weight and their sum
    card, plan = registry()["llama-3.2-1b"], Plan(method="lora", targets="q_proj", use_dora=True)
    d, r = 2048, 16
    assert transient_bytes(card, plan) == 4 * d * d + 4 * r * d + 4 * (4 * d * d)
    # bf16 adapters over bf16 weights: the weight is used as is (no copy), everything in bf16
    assert transient_bytes(card, plan.with_(adapter_dtype="bf16")) == 2 * d * d + 2 * r * d + 3 * (2 * d * d)
    assert transient_bytes(card, plan.with_(use_dora=False)) == 0


@pytest.mark.parametrize("name,plan", [
    # few tokens: the peak is the weight-norm working set (forward; checkpointed, the recomputation)
    ("llama-3.2-1b", Plan(method="lora", use_dora=True, targets="all-linear", batch_size=1, seq_len=16)),
    ("llama-3.2-1b", Plan(method="lora", use_dora=True, targets="q_proj,v_proj", batch_size=1, seq_len=16,
                          grad_checkpointing=True)),
    # dropout: peft recomputes the base output in fp32 and saves the weight's fp32 copy
    ("opt-125m", Plan(method="lora", use_dora=True, batch_size=2, seq_len=128, dropout=0.1)),
    # dropout, checkpointed (issue 12's stack grid, was -2.55%): the lowest block's recomputed norm runs beside
    # the module's input, its fp32 cast, the base output, the MLP's input and the block output's gradient
    ("llama-3.2-1b", Plan(method="lora", use_dora=True, dropout=0.1, grad_checkpointing=True, targets="all-linear",
                          batch_size=2, seq_len=256)),
    # QLoRA: the 4-bit weight dequantized in the norm; under autocast with checkpointing
    ("llama-3.2-1b", Plan(method="qlora", use_dora=True, targets="all-linear", batch_size=1, seq_len=16)),
    pytest.param("llama-3.2-1b", Plan(method="qlora", use_dora=True, batch_size=1, seq_len=16, autocast="bf16",
                                      kbit_prep=False, targets="all-linear", grad_checkpointing=True),
                 marks=pytest.mark.slow),
])
def test_estimate_within_2pct_of_peft_s_dora_trace(name, plan):
    pytest.importorskip("peft")
    from peftplan.trace.check import compare
    from peftplan.trace.run import trace

    card = small(name)
    tr = trace(card, plan)
    assert tr.impl == "peft"
    c = compare(estimate(card, plan), tr)
    assert abs(c.peak_error) <= 0.02, c
    # and DoRA is visible: the same plan without it peaks lower in the trace
    assert trace(card, plan.with_(use_dora=False)).peak_bytes < tr.peak_bytes


def test_cli_estimates_dora_and_refuses_it_off_lora(capsys):
    assert run_app(["estimate", "-m", "opt-125m", "--dora", "--json"]) == 0
    capsys.readouterr()
    assert run_app(["estimate", "-m", "opt-125m", "--dora", "--method", "full"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("peftplan: error:") and "LoRA and QLoRA only" in err
