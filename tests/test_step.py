"""The shared training step: real CPU steps on tiny models, the same step under FakeTensorMode (what the tracer
runs), the optimizers, the batch, and the counted parameters and bytes against the analytic accounting."""
from __future__ import annotations

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from peftplan.errors import PlanError
from peftplan.inject import TORCH_DTYPES
from peftplan.layers import LoRALinear, is_linear4bit
from peftplan.measure import (StepRun, build_model, count_model, make_batch, make_optimizer, run_steps,
                              train_step)
from peftplan.measure.count import quant_state_tensors
from peftplan.measure.step import PHASES
from peftplan.measure.tiny import tiny_card
from peftplan.planning.params import count, qlora_weight_bytes
from peftplan.plan import DTYPES, Plan

bnb = pytest.importorskip("bitsandbytes")



METHODS = {
    "full": Plan(method="full"),
    "top": Plan(method="top", top_k=1),
    "adapter": Plan(method="adapter", adapter_size=8),
    "lora": Plan(method="lora", r=4),
    "qlora": Plan(method="qlora", r=4),
}


def small(plan: Plan, **changes) -> Plan:
    return plan.with_(batch_size=2, seq_len=16, **changes)


# ---------------------------------------------------------------- fake tensors (the tracer's path)


def _fake_run(card, plan, steps=2):
    phases: list[str] = []
    with FakeTensorMode():
        model, inj = build_model(card, plan, "cpu")
        batch = make_batch(card, plan, "cpu")
        optimizer = make_optimizer(model, plan)
        losses = [train_step(model, batch, optimizer, plan, on_phase=phases.append) for _ in range(steps)]
    return model, inj, optimizer, losses, phases


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("method", METHODS)
def test_step_runs_under_fake_tensors(family, method):
    card, plan = tiny_card(family), small(METHODS[method], dtype="bf16")
    model, inj, optimizer, losses, phases = _fake_run(card, plan)
    assert phases == list(PHASES) * 2
    assert all(isinstance(p, FakeTensor) for p in model.parameters())
    assert all(isinstance(b, FakeTensor) for b in model.buffers())
    assert all(isinstance(v, FakeTensor) for s in optimizer.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))
    assert isinstance(losses[-1], FakeTensor) and losses[-1].shape == ()
    counted, est = count_model(model), count(card, plan)
    assert (counted.total, counted.trainable) == (est.total, est.trainable)
    if method == "qlora":
        quantized = [m for m in model.modules() if is_linear4bit(m)]
        assert quantized and all(isinstance(t, FakeTensor) for m in quantized
                                 for t in quant_state_tensors(m.weight.quant_state))


@pytest.mark.parametrize("optimizer", ["adamw8bit", "paged-adamw", "paged-adamw8bit", "sgd", "sgd-momentum"])
def test_fake_step_with_every_optimizer(optimizer):
    _fake_run(tiny_card("llama"), small(METHODS["qlora"], optimizer=optimizer), steps=1)


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_fake_step_with_checkpointing_and_eager_attention(method):
    _fake_run(tiny_card("llama"), small(METHODS[method], grad_checkpointing=True, attention="eager"), steps=1)


def test_fake_qlora_bytes_equal_real_qlora_bytes():
    card, plan = tiny_card("opt"), small(METHODS["qlora"], dtype="bf16")
    with FakeTensorMode():
        fake, _ = build_model(card, plan, "cpu")
        fake_count = count_model(fake)
    real, _ = build_model(card, plan, "cpu")
    assert fake_count == count_model(real)


# ---------------------------------------------------------------- training works


def _trained(card, plan, steps, lr):
    model, inj = build_model(card, plan)
    batch = make_batch(card, plan, "cpu")
    optimizer = make_optimizer(model, plan)
    for g in optimizer.param_groups:
        g["lr"] = lr
    losses = [train_step(model, batch, optimizer, plan).item() for _ in range(steps)]
    return model, inj, losses


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("method", METHODS)
def test_loss_decreases_on_a_fixed_batch(family, method):
    _, _, losses = _trained(tiny_card(family), small(METHODS[method], dtype="fp32"), steps=5, lr=1e-2)
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gpt2", "bert", "roberta"])
@pytest.mark.parametrize("method", ["lora", "qlora", "adapter"])
def test_loss_decreases_in_other_families(family, method):
    _, _, losses = _trained(tiny_card(family), small(METHODS[method], dtype="fp32"), steps=5, lr=1e-2)
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("optimizer", ["adamw8bit", "paged-adamw", "paged-adamw8bit", "sgd", "sgd-momentum"])
def test_loss_decreases_with_every_optimizer(optimizer):
    lr = 0.3 if optimizer.startswith("sgd") else 1e-2
    _, _, losses = _trained(tiny_card("llama"), small(METHODS["lora"], optimizer=optimizer, dtype="fp32"), 5, lr)
    assert losses[-1] < losses[0], losses


# ---------------------------------------------------------------- only the method's parameters move


def _frozen_snapshot(model) -> dict[str, list[torch.Tensor]]:
    out = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            state = getattr(p, "quant_state", None)
            out[n] = [p.detach().clone()] + [t.clone() for t in (quant_state_tensors(state) if state else ())]
    return out


@pytest.mark.parametrize("family", ["opt", "llama", "gpt2", "bert"])
@pytest.mark.parametrize("method", ["top", "adapter", "lora", "qlora"])
def test_only_adapter_parameters_get_gradients_and_base_stays_bitwise(family, method):
    card, plan = tiny_card(family), small(METHODS[method], dtype="fp32")
    model, inj = build_model(card, plan)
    batch = make_batch(card, plan, "cpu")
    optimizer = make_optimizer(model, plan)
    before_forward = _frozen_snapshot(model)
    model(**batch).loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == set(inj.trainable)
    before_step = _frozen_snapshot(model)
    trainable_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    after = _frozen_snapshot(model)
    assert before_step.keys() == after.keys()
    for n in after:
        assert all(torch.equal(a, b) for a, b in zip(before_step[n], after[n])), n
    if method != "qlora":  # bitsandbytes recasts a Linear4bit's bias to its compute dtype in the forward
        for n in after:
            assert all(torch.equal(a, b) for a, b in zip(before_forward[n], after[n])), n
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable_before[n])]
    assert moved


# ---------------------------------------------------------------- counted bytes


@pytest.mark.parametrize("family", ["opt", "llama", "qwen2", "gpt2", "bert"])
@pytest.mark.parametrize("double_quant,kbit_prep", [(True, True), (True, False), (False, True)])
def test_qlora_stored_bytes_equal_the_analytic_bytes(family, double_quant, kbit_prep):
    card = tiny_card(family)
    plan = small(METHODS["qlora"], double_quant=double_quant, kbit_prep=kbit_prep, dtype="bf16")
    model, _ = build_model(card, plan)
    est = count(card, plan)
    e = 4 if kbit_prep else DTYPES[plan.dtype]  # k-bit preparation stores every other tensor in fp32
    # LoRA's A and B in plan.adapter_dtype (fp32 by default, as peft's autocast_adapter_dtype leaves them)
    expected = qlora_weight_bytes(card, double_quant) + e * (est.base - est.quantized) \
        + DTYPES[plan.adapter_dtype] * est.added
    counted = count_model(model)
    assert counted.stored_bytes == expected
    assert (counted.total, counted.trainable) == (est.total, est.trainable)


def test_linear4bit_biases_fall_back_to_the_compute_dtype_after_a_forward():
    """A fact for the memory model: with k-bit preparation the biases of 4-bit layers are fp32 only until
    bitsandbytes' Linear4bit.forward casts them (in place, `bias.data = bias.data.to(x.dtype)`) to bf16."""
    card = tiny_card("opt")
    plan = small(METHODS["qlora"], dtype="bf16")
    model, _ = build_model(card, plan)
    before = count_model(model).stored_bytes
    model(**make_batch(card, plan, "cpu"))
    biases = sum(m.bias.numel() for m in model.modules() if is_linear4bit(m) and m.bias is not None)
    assert biases > 0 and count_model(model).stored_bytes == before - 2 * biases


@pytest.mark.parametrize("kbit_prep", [True, False])
def test_kbit_preparation_makes_the_activations_fp32(kbit_prep):
    """A fact for the memory model: with fp32 embeddings and norms the residual stream is fp32, and Linear4bit
    computes in bf16 but returns its input's dtype, so a QLoRA step with k-bit preparation holds fp32 activations."""
    card = tiny_card("llama")
    plan = small(METHODS["qlora"], dtype="bf16", kbit_prep=kbit_prep)
    model, _ = build_model(card, plan)
    dtypes = []
    for name in ("model.layers.0", "model.layers.0.self_attn.q_proj.base", "model.layers.1.mlp.down_proj"):
        model.get_submodule(name).register_forward_hook(lambda m, i, o: dtypes.append((i[0].dtype, o.dtype)))
    logits = model(**make_batch(card, plan, "cpu")).logits
    expected = torch.float32 if kbit_prep else torch.bfloat16
    assert logits.dtype == expected and set(dtypes) == {(expected, expected)}


@pytest.mark.parametrize("method", METHODS)
def test_stored_bytes_of_float_models(method):
    card, plan = tiny_card("llama"), small(METHODS[method], dtype="bf16")
    if method == "qlora":
        plan = plan.with_(kbit_prep=False)
    model, _ = build_model(card, plan)
    est = count(card, plan)
    if method != "qlora":  # LoRA's A and B are fp32 (peft's default), the rest bf16
        added = est.added if plan.uses_lora else 0
        assert count_model(model).stored_bytes == 2 * (est.total - added) + 4 * added
    assert count_model(model).buffer_bytes == 2 * 4 * card.head_dim // 2  # inv_freq + original_inv_freq, fp32


def test_tied_weights_stay_tied():
    card = tiny_card("opt")
    model, _ = build_model(card, small(METHODS["full"]))
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    bert, _ = build_model(tiny_card("bert"), small(METHODS["full"]))
    assert bert.cls.predictions.decoder.weight is bert.bert.embeddings.word_embeddings.weight


# ---------------------------------------------------------------- batch, optimizer, options


def test_batch_is_fixed_and_shaped():
    card, plan = tiny_card("llama"), small(Plan())
    a, b = make_batch(card, plan, "cpu"), make_batch(card, plan, "cpu")
    assert set(a) == {"input_ids", "labels"} and a["input_ids"].shape == (2, 16)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], a["input_ids"])
    assert a["labels"].data_ptr() != a["input_ids"].data_ptr()
    assert int(a["input_ids"].max()) < card.vocab_size


def test_encoder_batch_has_masked_lm_labels():
    card, plan = tiny_card("bert"), small(Plan())
    batch = make_batch(card, plan, "cpu")
    labelled = batch["labels"] != -100
    assert labelled[:, ::7].all() and labelled.sum() == 2 * math.ceil(16 / 7)


def test_sequence_longer_than_learned_positions_is_refused():
    with pytest.raises(PlanError, match="exceeds the 64 positions"):
        make_batch(tiny_card("opt"), Plan(seq_len=65), "cpu")


def test_optimizers_are_the_plan_s():
    model, _ = build_model(tiny_card("llama"), small(METHODS["full"], dtype="fp32"))
    adamw = make_optimizer(model, Plan(optimizer="adamw", foreach=False))
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.defaults["foreach"] is False and adamw.defaults["fused"] is False and adamw.defaults["lr"] == 1e-4
    assert make_optimizer(model, Plan(optimizer="adamw", foreach=True)).defaults["foreach"] is True
    sgd = make_optimizer(model, Plan(optimizer="sgd"))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.0 and sgd.defaults["lr"] == 1e-2
    assert make_optimizer(model, Plan(optimizer="sgd-momentum")).defaults["momentum"] == 0.9
    assert isinstance(make_optimizer(model, Plan(optimizer="adamw8bit")), bnb.optim.AdamW8bit)
    assert isinstance(make_optimizer(model, Plan(optimizer="paged-adamw")), bnb.optim.PagedAdamW)
    paged8 = make_optimizer(model, Plan(optimizer="paged-adamw8bit"))
    assert isinstance(paged8, bnb.optim.PagedAdamW8bit) and paged8.is_paged


def test_adamw8bit_keeps_8bit_states_from_4096_elements():
    card, plan = tiny_card("llama"), small(METHODS["full"], optimizer="adamw8bit", dtype="fp32")
    model, _ = build_model(card, plan)
    optimizer = make_optimizer(model, plan)
    train_step(model, make_batch(card, plan, "cpu"), optimizer, plan)
    for p in model.parameters():
        state = optimizer.state[p]
        assert state["state1"].dtype == (torch.uint8 if p.numel() >= 4096 else torch.float32)
        if p.numel() >= 4096:
            assert state["absmax1"].numel() == math.ceil(p.numel() / 256)


def test_nothing_to_train_is_refused():
    model, _ = build_model(tiny_card("llama"), small(METHODS["lora"]))
    model.requires_grad_(False)
    with pytest.raises(PlanError, match="no trainable"):
        make_optimizer(model, Plan())


@pytest.mark.parametrize("method", ["lora", "full"])
def test_checkpointing_and_attention_change_memory_not_results(method):
    card = tiny_card("llama")
    ref = _trained(card, small(METHODS[method], dtype="fp32"), 2, 1e-2)[2]
    checkpointed = _trained(card, small(METHODS[method], dtype="fp32", grad_checkpointing=True), 2, 1e-2)[2]
    eager = _trained(card, small(METHODS[method], dtype="fp32", attention="eager"), 2, 1e-2)[2]
    assert checkpointed == pytest.approx(ref, abs=1e-6)
    assert eager == pytest.approx(ref, abs=1e-5)


def test_build_uses_the_plan_dtype_and_seed():
    card = tiny_card("llama")
    a, _ = build_model(card, small(METHODS["lora"], dtype="bf16"), seed=7)
    b, _ = build_model(card, small(METHODS["lora"], dtype="bf16"), seed=7)
    assert all(p.dtype == (TORCH_DTYPES["fp32"] if "lora_" in n else TORCH_DTYPES["bf16"])
               for n, p in a.named_parameters())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert a.training and not a.config.use_cache
    assert all(isinstance(a.get_submodule(n), LoRALinear) for n in ("model.layers.0.self_attn.q_proj",))


def test_run_steps_reports_what_happened():
    card, plan = tiny_card("opt"), small(METHODS["lora"], dtype="fp32")
    phases: list[str] = []
    run = run_steps(card, plan, "cpu", 3, on_phase=phases.append)
    assert isinstance(run, StepRun) and len(run.losses) == len(run.step_seconds) == 3
    assert phases == list(PHASES) * 3
    assert run.tokens_per_s > 0 and run.peak_allocated_bytes == 0 and run.device == "cpu"
    assert run.count.trainable == count(card, plan).trainable and run.injection.method == "lora"
    with pytest.raises(PlanError):
        run_steps(card, plan, "cpu", 0)
