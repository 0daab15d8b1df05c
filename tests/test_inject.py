"""Injection into tiny random models of every family: counts equal the estimate's, the right modules are
wrapped, quantized and frozen, the injected model starts as the base model, and bad input fails clearly.

Tolerances: LoRA (B = 0) logits bitwise equal to the base model's; fresh Houlsby adapters keep logits within
1e-2 relative (Frobenius) of the base model's; merge() after training within 1e-4 absolute (fp32).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from peftplan.errors import PlanError
from peftplan.inject import adapter_sites, inject, is_norm, linear_modules
from peftplan.layers import LoRALinear, is_linear, is_linear4bit
from peftplan.planning.layout import layout
from peftplan.measure import build_model, count_model, make_batch, make_optimizer, train_step
from peftplan.measure.step import step_config
from peftplan.measure.tiny import tiny_card
from peftplan.planning.params import count, lora_targets
from peftplan.plan import Plan

bnb = pytest.importorskip("bitsandbytes")



FAMILIES = ["opt", "llama", "mistral", "qwen2", "gemma2", "phi3", "gpt2", "bert", "roberta"]
# Houlsby's sites as transformers names them: each family's attention output and FFN output projection
SITES = {"opt": ("self_attn.out_proj", "fc2"), "gpt2": ("attn.c_proj", "mlp.c_proj"),
         "bert": ("attention.output.dense", "output.dense"), "roberta": ("attention.output.dense", "output.dense")}
SITES |= {f: ("self_attn.o_proj", "mlp.down_proj") for f in ("llama", "mistral", "qwen2", "gemma2", "phi3")}
PLANS = {
    "full": Plan(method="full"),
    "top": Plan(method="top", top_k=1),
    "adapter": Plan(method="adapter", adapter_size=8),
    "adapter-ffn": Plan(method="adapter", adapter_size=8, adapter_placement="ffn"),
    "lora": Plan(method="lora", r=4),
    "lora-all": Plan(method="lora", r=4, targets="all-linear"),
    "qlora": Plan(method="qlora", r=4),
    "qlora-all-nodq": Plan(method="qlora", r=4, targets="all-linear", double_quant=False),
}


def plan_for(family: str, plan: Plan, **changes) -> Plan:
    if family == "phi3" and plan.uses_lora and plan.targets is None:
        changes.setdefault("targets", "qkv_proj,o_proj")  # peft has no default targets for phi3
    if family == "gemma2":
        changes.setdefault("attention", "eager")  # transformers has no SDPA path for gemma2
    return plan.with_(batch_size=2, seq_len=16, **changes)


def logits(model: nn.Module, batch: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


# ---------------------------------------------------------------- counts


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", PLANS)
def test_counts_equal_the_estimate(family, name):
    card, plan = tiny_card(family), plan_for(family, PLANS[name])
    model, injection = build_model(card, plan)
    counted, est = count_model(model), count(card, plan)
    assert (counted.total, counted.trainable) == (est.total, est.trainable)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(injection.trainable)


def meta_model(card):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    with torch.device("meta"):
        auto = AutoModelForMaskedLM if card.encoder else AutoModelForCausalLM
        return auto.from_config(step_config(card, Plan()))


@pytest.mark.parametrize("family", ["opt", "llama", "gpt2", "bert"])
@pytest.mark.parametrize("spec", [None, "all-linear", "fc1,fc2,c_fc,up_proj,intermediate.dense"])
def test_matching_agrees_with_params(family, spec):
    card = tiny_card(family)
    if spec and "," in spec:
        spec = {"opt": "fc1,fc2", "llama": "up_proj", "gpt2": "c_fc", "bert": "intermediate.dense"}[family]
    inj = inject(meta_model(card), card, Plan(method="lora", r=4, targets=spec))
    expected = {layout(card).block_name(i, lin.name) if in_block else lin.name
                for lin, in_block, _ in lora_targets(card, spec) for i in range(card.n_layers if in_block else 1)}
    assert set(inj.wrapped) == expected


def test_regex_targets_match_in_full():
    card = tiny_card("llama")
    plan = plan_for("llama", Plan(method="lora", r=4, targets=r"re:model\.layers\.\d+\.self_attn\.(q|v)_proj"))
    _, inj = build_model(card, plan)
    assert sorted(inj.wrapped) == sorted(f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv")


# ---------------------------------------------------------------- what is wrapped, frozen, quantized


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_trains_only_a_and_b(family):
    card, plan = tiny_card(family), plan_for(family, PLANS["lora-all"])
    model, inj = build_model(card, plan)
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == set(inj.wrapped)
    # all-linear: every Linear but the head is now a LoRA base (or a LoRA matrix itself)
    assert set(linear_modules(model)) == {f"{n}.{c}" for n in wrapped for c in ("base", "lora_a", "lora_b")}
    assert set(inj.trainable) == {f"{n}.lora_{x}.weight" for n in wrapped for x in "ab"}
    assert model.get_output_embeddings() not in [m.base for m in model.modules() if isinstance(m, LoRALinear)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("placement", ["houlsby", "ffn"])
def test_adapters_sit_on_the_output_projections(family, placement):
    card = tiny_card(family)
    plan = plan_for(family, Plan(method="adapter", adapter_size=8, adapter_placement=placement))
    model, inj = build_model(card, plan)
    attn, ffn = SITES[family]
    assert adapter_sites(card) == (attn, ffn)  # read from the Linears' roles
    sites = (attn, ffn) if placement == "houlsby" else (ffn,)
    lay = layout(card)
    assert list(inj.wrapped) == [lay.block_name(i, s) for i in range(card.n_layers) for s in sites]
    calls = []
    for name in inj.wrapped:
        model.get_submodule(name).register_forward_hook(lambda m, i, o: calls.append(m))
    model(**make_batch(card, plan, "cpu"))
    assert len(calls) == len(sites) * card.n_layers  # each adapter runs once per forward
    norms = {f"{m}.{p}" for m, mod in model.named_modules() if is_norm(mod)
             for p, _ in mod.named_parameters(recurse=False)}
    adapters = {n for n, _ in model.named_parameters() if ".adapter." in n}
    assert set(inj.trainable) == norms | adapters and norms


@pytest.mark.parametrize("family", ["opt", "llama", "gpt2", "bert"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_qlora_quantizes_every_linear_but_the_head(family, double_quant):
    card = tiny_card(family)
    plan = plan_for(family, Plan(method="qlora", r=4, double_quant=double_quant, dtype="bf16"))
    model, inj = build_model(card, plan)
    head = model.get_output_embeddings()
    assert not is_linear4bit(head) and head.weight.dtype == torch.float32  # tied or not, upcast by k-bit prep
    quantized = {n for n, m in model.named_modules() if is_linear4bit(m)}
    assert quantized == set(inj.quantized) >= {f"{n}.base" for n in inj.wrapped}
    plain = [n for n, m in model.named_modules() if is_linear(m) and not is_linear4bit(m) and m is not head
             and not n.endswith((".lora_a", ".lora_b"))]
    assert plain == []
    for n in quantized:
        q = model.get_submodule(n)
        assert isinstance(q.weight, bnb.nn.Params4bit) and q.weight.quant_state.quant_type == "nf4"
        assert q.weight.quant_state.nested == double_quant and q.compute_dtype == torch.bfloat16
    for n in inj.wrapped:
        assert is_linear4bit(model.get_submodule(n).base)
    # k-bit preparation: every other parameter was bf16 and is now fp32, LoRA included
    others = {n for n, p in model.named_parameters() if type(p).__name__ != "Params4bit"}
    assert set(inj.upcast) == others - set(inj.trainable)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in others)
    assert inj.adapter_dtype == "fp32"


@pytest.mark.parametrize("adapter_dtype,lora_torch_dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_qlora_without_kbit_prep_keeps_the_plan_dtype(adapter_dtype, lora_torch_dtype):
    card = tiny_card("llama")
    plan = Plan(method="qlora", r=4, kbit_prep=False, dtype="bf16", adapter_dtype=adapter_dtype)
    model, inj = build_model(card, plan_for("llama", plan))
    assert inj.upcast == () and inj.adapter_dtype == adapter_dtype
    base = {p.dtype for n, p in model.named_parameters() if type(p).__name__ != "Params4bit" and "lora_" not in n}
    assert base == {torch.bfloat16}
    assert {model.get_parameter(n).dtype for n in inj.trainable} == {lora_torch_dtype}


@pytest.mark.parametrize("method", ["top", "full"])
def test_top_and_full_train_declared_blocks(method):
    card = tiny_card("llama")
    model, inj = build_model(card, plan_for("llama", PLANS[method]))
    names = [n for n, _ in model.named_parameters()]
    if method == "full":
        assert list(inj.trainable) == names
    else:
        assert set(inj.trainable) == {n for n in names if n.startswith("model.layers.1.")}


# ---------------------------------------------------------------- the injected model starts as the base model


def _pair(family: str, plan: Plan):
    card = tiny_card(family)
    base, _ = build_model(card, plan_for(family, Plan(method="full", dtype="fp32")), seed=3)
    model, _ = build_model(card, plan_for(family, plan.with_(dtype="fp32")), seed=3)
    return card, base, model


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_with_zero_b_gives_the_base_outputs_exactly(family):
    card, base, model = _pair(family, PLANS["lora-all"])
    batch = make_batch(card, plan_for(family, Plan()), "cpu")
    assert torch.equal(logits(model, batch), logits(base, batch))


@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_adapters_stay_close_to_the_base(family):
    card, base, model = _pair(family, PLANS["adapter"])
    batch = make_batch(card, plan_for(family, Plan()), "cpu")
    a, b = logits(model, batch), logits(base, batch)
    assert not torch.equal(a, b)
    assert ((a - b).norm() / b.norm()).item() <= 1e-2


@pytest.mark.parametrize("family", ["opt", "llama", "gpt2", "bert"])
def test_merge_after_training_matches_unmerged(family):
    card = tiny_card(family)
    plan = plan_for(family, Plan(method="lora", r=4, targets="all-linear", dtype="fp32"))
    model, _ = build_model(card, plan)
    batch = make_batch(card, plan, "cpu")
    opt = make_optimizer(model, plan)
    for g in opt.param_groups:
        g["lr"] = 1e-2
    for _ in range(3):
        train_step(model, batch, opt, plan)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert all(torch.count_nonzero(m.lora_b.weight) > 0 for m in layers)
    unmerged = logits(model, batch)
    for m in layers:
        m.merge()
    assert (logits(model, batch) - unmerged).abs().max().item() <= 1e-4


# ---------------------------------------------------------------- bad input: one clear line each


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_targets_matching_nothing_list_the_candidates():
    card = tiny_card("opt")
    with pytest.raises(PlanError) as e:
        build_model(card, Plan(method="lora", targets="query,value"))
    msg = _one_line(e)
    assert "match no Linear" in msg and "q_proj" in msg and "fc1" in msg


def test_rank_larger_than_the_matrix():
    with pytest.raises(PlanError) as e:
        build_model(tiny_card("llama"), Plan(method="lora", r=65))
    assert "exceeds" in _one_line(e)


def test_model_type_without_default_targets():
    with pytest.raises(PlanError) as e:
        build_model(tiny_card("phi3"), Plan(method="lora"))
    assert "no default LoRA targets" in _one_line(e) and "phi3" in str(e.value)


def test_model_and_card_must_agree():
    """Any architecture is injected by its Linears' roles; a model built from another card is refused."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gpt_neox", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, vocab_size=128)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(PlanError) as e:
        inject(model, tiny_card("opt"), Plan())
    assert "the model is a 'gpt_neox' but the card" in _one_line(e)


def test_unknown_architecture_in_a_config_json():
    from peftplan.planning.cards import card_from_hf_config

    with pytest.raises(PlanError) as e:
        card_from_hf_config({"model_type": "gpt_neox", "hidden_size": 64}, name="x", source="x")
    assert "not supported" in _one_line(e)


def test_model_and_card_must_agree():
    with pytest.raises(PlanError) as e:
        inject(meta_model(tiny_card("mistral")), tiny_card("llama"), Plan())
    assert "card" in _one_line(e)


def test_injecting_twice_is_refused():
    card = tiny_card("llama")
    model, _ = build_model(card, Plan(method="lora", r=4))
    with pytest.raises(PlanError, match="already"):
        inject(model, card, Plan(method="lora", r=4))


def test_gemma2_without_sdpa_is_a_plan_error():
    with pytest.raises(PlanError) as e:
        build_model(tiny_card("gemma2"), Plan(method="lora", r=4, attention="sdpa"))
    assert "attention 'sdpa'" in _one_line(e)


def test_upcast_is_recorded_by_name():
    card = tiny_card("opt")
    model, inj = build_model(card, Plan(method="qlora", r=4, dtype="bf16"))
    assert "model.decoder.embed_tokens.weight" in inj.upcast
    assert "model.decoder.layers.0.self_attn_layer_norm.weight" in inj.upcast
    assert all(not n.endswith((".lora_a.weight", ".lora_b.weight")) for n in inj.upcast)
    assert dataclasses.asdict(inj)["method"] == "qlora"
