"""The stack users run: peft's fp32 adapters, the Trainer's mixed precision, accumulation and clipping."""
import dataclasses
import subprocess
import sys

import pytest

from peftplan.errors import PlanError
from peftplan.plan import Plan
from peftplan.planning import estimate
from peftplan.planning.cards import load_card, registry
from peftplan.planning.memory import cached_static_memory, rounded


def small(name: str, layers: int = 2):
    return dataclasses.replace(registry()[name], n_layers=layers, name=f"{name}-{layers}L")


def _meta_linear_numel(card) -> tuple[int, int]:
    """(numel of every nn.Linear weight and bias, numel of all parameters) of transformers' own model."""
    torch = pytest.importorskip("torch")
    from peftplan.measure.step import step_config
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(step_config(card, Plan()))
    lin = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters())
    return lin, sum(p.numel() for p in model.parameters())


def test_mixed_precision_full_ft_7b_is_4_4_8_plus_autocast_cache():
    card = load_card("llama-2-7b")
    amp = estimate(card, Plan(method="full", dtype="fp32", autocast="bf16", batch_size=1, seq_len=512))
    n = amp.params.trainable
    lin, total = _meta_linear_numel(card)
    assert n == total
    fwd, _, opt = amp.phases
    assert fwd.trainable_weights_bytes == pytest.approx(4 * n, rel=1e-6)
    assert opt.gradients_bytes == pytest.approx(4 * n, rel=1e-6)
    assert fwd.optimizer_states_bytes == pytest.approx(8 * n, rel=1e-4)  # + a fp32 `step` per tensor
    # the autocast cache: a bf16 copy of every Linear weight (the head included; embeddings and norms are not
    # autocast ops), live through forward
    assert fwd.temporaries_bytes == 2 * lin


def test_pure_bf16_full_ft_is_2_2_4_and_no_cache():
    card = load_card("llama-2-7b")
    est = estimate(card, Plan(method="full", dtype="bf16", batch_size=1, seq_len=512))
    n = est.params.trainable
    fwd, _, opt = est.phases
    assert fwd.trainable_weights_bytes == pytest.approx(2 * n, rel=1e-6)
    assert opt.gradients_bytes == pytest.approx(2 * n, rel=1e-6)
    assert fwd.optimizer_states_bytes == pytest.approx(4 * n, rel=1e-4)
    assert fwd.temporaries_bytes == 0


def test_grad_accum_raises_full_ft_backward_by_the_gradients():
    # a backward that peaks at its start (logits dominate), so the gradients held from micro-step 1 add whole
    card = load_card("opt-125m")
    base = Plan(method="full", batch_size=8, seq_len=512)
    one, two = estimate(card, base), estimate(card, base.with_(grad_accum=2))
    grads = cached_static_memory(card, base).gradients_bytes
    assert two.phases[1].tensor_bytes - one.phases[1].tensor_bytes == grads
    assert two.phases[0].tensor_bytes - one.phases[0].tensor_bytes == grads
    assert two.phases[2] == one.phases[2]  # the step itself does not change


def test_adapter_dtype_changes_exactly_its_terms():
    card = load_card("llama-3.1-8b")
    p32 = Plan(method="lora", targets="all-linear", batch_size=2, seq_len=1024)
    e32, e16 = estimate(card, p32), estimate(card, p32.with_(adapter_dtype="bf16"))
    n = e32.params.trainable
    f32, f16 = e32.phases[0], e16.phases[0]
    assert f32.trainable_weights_bytes - f16.trainable_weights_bytes == pytest.approx(2 * n, rel=1e-3)
    assert f32.optimizer_states_bytes - f16.optimizer_states_bytes == pytest.approx(4 * n, rel=1e-3)
    assert (f32.frozen_weights_bytes, f32.logits_bytes) == (f16.frozen_weights_bytes, f16.logits_bytes)
    # activations: each of the 7 wrapped Linears of a block saves its own fp32 copy of its input (peft casts x
    # per module) instead of the shared bf16 input; lora_B's input A·x is fp32 (4r instead of 2r)
    c, t, r = card, p32.tokens, p32.r
    per_block_fp32 = 4 * (3 * c.d_model + c.d_q + 2 * c.d_model + c.d_ff) + 7 * 4 * r
    per_block_bf16 = 2 * (c.d_model + c.d_model) + 7 * 2 * r  # shared inputs; o_proj/down read saved tensors
    per_block_bf16 += 2 * c.d_ff  # down_proj's input (act(gate)·up) is saved for LoRA's A in bf16
    expected = (per_block_fp32 - per_block_bf16) * t * c.n_layers
    assert f32.activations_bytes - f16.activations_bytes == pytest.approx(expected, rel=0.01)


def test_clipping_temporaries_are_per_gradient_scalars():
    from peftplan.planning.memory import clip_temporaries, trainable_tensors

    card, plan = load_card("opt-125m"), Plan(method="lora")
    n = len(trainable_tensors(card, plan))
    assert n == 2 * 2 * card.n_layers  # A and B on q_proj and v_proj
    assert clip_temporaries(card, plan) == n * rounded(4) + rounded(4 * n) + 3 * rounded(4)
    assert clip_temporaries(card, plan.with_(max_grad_norm=0)) == 0


@pytest.mark.parametrize("args,needle", [
    (["--grad-accum", "0"], "gradient accumulation"),
    (["--autocast", "fp16", "--dtype", "bf16"], "autocast fp16 over bf16"),
    (["--adapter-dtype", "bf16", "--dtype", "fp32"], "narrower"),
    (["--autocast", "bf16", "--dtype", "fp32", "--gpu", "t4"], "no bf16 support"),
    (["--autocast", "fp8"], "unknown autocast"),
    (["--grad-accum", "-1"], "gradient accumulation"),
    (["--dora", "--method", "full"], "LoRA and QLoRA only"),
])
def test_bad_precision_input_is_one_line_exit_2(args, needle):
    r = subprocess.run([sys.executable, "-m", "peftplan", "estimate", *args], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("peftplan: error:") and needle in r.stderr


def test_plan_rejects_contradictions_in_python():
    with pytest.raises(PlanError):
        Plan(autocast="bf16", dtype="fp16")
    with pytest.raises(PlanError):
        Plan(method="full", use_dora=True)


@pytest.mark.parametrize("name,plan", [
    ("opt-125m", Plan(method="lora", batch_size=2, seq_len=128, dropout=0.1)),
    ("llama-3.2-1b", Plan(method="lora", targets="all-linear", batch_size=1, seq_len=128)),
    ("llama-3.2-1b", Plan(method="qlora", batch_size=1, seq_len=128)),
])
def test_our_lora_holds_what_peft_holds(name, plan):
    pytest.importorskip("peft")
    from peftplan.trace.run import trace

    card = small(name)
    theirs, ours = trace(card, plan, impl="peft"), trace(card, plan, impl="ours")
    assert theirs.impl == "peft" and ours.impl == "ours"
    assert ours.peak_bytes == pytest.approx(theirs.peak_bytes, rel=0.005)


@pytest.mark.parametrize("plan", [
    Plan(method="full", batch_size=2, seq_len=128, grad_accum=2),
    pytest.param(Plan(method="lora", batch_size=2, seq_len=128, grad_accum=3, dropout=0.1),
                 marks=pytest.mark.slow),
    Plan(method="lora", batch_size=2, seq_len=128, adapter_dtype="bf16", attention="flash"),
    pytest.param(Plan(method="qlora", batch_size=2, seq_len=128, kbit_prep=False, grad_checkpointing=True),
                 marks=pytest.mark.slow),
    # the Trainer's autocast, run in the trace with CUDA's op lists
    pytest.param(Plan(method="full", dtype="fp32", autocast="bf16", batch_size=2, seq_len=128), marks=pytest.mark.slow),
    Plan(method="full", dtype="fp32", autocast="bf16", batch_size=2, seq_len=128, grad_checkpointing=True),
    Plan(method="qlora", autocast="bf16", batch_size=2, seq_len=128, grad_accum=2),
    pytest.param(Plan(method="lora", dtype="fp32", autocast="fp16", batch_size=2, seq_len=128,
                      grad_checkpointing=True), marks=pytest.mark.slow),
])
def test_stack_options_estimate_within_2pct_of_peft_trace(plan):
    from peftplan.trace.check import compare
    from peftplan.trace.run import trace

    card = small("llama-3.2-1b")
    c = compare(estimate(card, plan), trace(card, plan))
    assert abs(c.peak_error) <= 0.02, c


def test_cuda_autocast_emulation_follows_cudas_lists():
    torch = pytest.importorskip("torch")
    from peftplan.measure.autocast import CudaAutocast

    w = torch.nn.Parameter(torch.randn(8, 4))
    x = torch.randn(2, 4, dtype=torch.float32)
    with CudaAutocast(torch.bfloat16) as mode:
        y = torch.nn.functional.linear(x, w)  # lower-precision list
        y2 = torch.nn.functional.linear(x, w)
        p = torch.softmax(y, dim=-1)  # fp32 list (CPU autocast would keep bf16 here)
        r = torch.relu(y)  # in neither list: runs in its input's dtype
    assert y.dtype == torch.bfloat16 and p.dtype == torch.float32 and r.dtype == torch.bfloat16
    assert len(mode.cache) == 1 and y2.dtype == torch.bfloat16  # the weight was cast once


def test_reentrant_checkpointing_under_emulated_autocast_is_refused():
    pytest.importorskip("torch")
    from peftplan.trace.run import trace

    with pytest.raises(PlanError, match="reentrant"):
        trace(small("opt-125m"), Plan(method="full", dtype="fp32", autocast="bf16", grad_checkpointing=True,
                                      use_reentrant=True, seq_len=32))


def test_peft_build_with_checkpointing_prints_no_deprecation_warning():
    """peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing`; the trace must not print it."""
    import warnings

    from peftplan.measure.step import build_model

    card = load_card("opt-125m")
    plan = Plan(method="lora", grad_checkpointing=True, batch_size=1, seq_len=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        build_model(card, plan, device="cpu", impl="peft")


def test_breakdown_title_names_the_stack_on_one_line():
    out = subprocess.run([sys.executable, "-m", "peftplan", "estimate", "--model", "llama-3.1-8b", "--method", "qlora",
                          "--autocast", "bf16", "--grad-accum", "4", "--grad-checkpointing", "--use-reentrant"],
                         capture_output=True, text=True, check=True).stdout
    title = next(line for line in out.splitlines() if line.startswith("peak memory by component"))
    for part in ("b=1", "s=512", "bf16 autocast", "grad-accum 4", "checkpointing (reentrant)", "sdpa"):
        assert part in title
    plain = subprocess.run([sys.executable, "-m", "peftplan", "estimate", "--model", "llama-3.1-8b"],
                           capture_output=True, text=True, check=True).stdout
    assert "autocast" not in plain and "grad-accum" not in plain


def test_qlora_trace_uses_pefts_bitsandbytes_lora_class():
    """A 4-bit load sets `is_loaded_in_4bit`, and peft then wraps each Linear4bit in its bitsandbytes LoRA class
    (peft/tuners/lora/bnb.py: base output cloned, no input cast under autocast), not the generic lora.Linear."""
    from peft.tuners.lora.bnb import Linear4bit as PeftLoraLinear4bit

    from peftplan.measure.step import build_model
    from peftplan.trace.random_check import cut

    model, _ = build_model(cut(load_card("llama-3.2-1b"), 1), Plan(method="qlora", batch_size=1, seq_len=16),
                           device="cpu", impl="peft")
    wrapped = [m for m in model.modules() if isinstance(m, PeftLoraLinear4bit)]
    assert len(wrapped) == 2  # q_proj and v_proj of the one block
