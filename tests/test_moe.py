"""Mixture of experts (issue 11 part 3): routing rules, the forced routing of the trace, MoE memory terms held to
the fake-tensor trace, QLoRA on fused experts, the --moe-routing option."""
from __future__ import annotations

import dataclasses
import math

import pytest

from peftplan.plan import Plan
from peftplan.planning import estimate
from peftplan.planning.cards import registry
from peftplan.planning.moe import expert_params, fused_experts, routing, tokens_per_expert
from peftplan.planning.params import total_params
from peftplan.trace.random_check import cut


@pytest.mark.parametrize("t,k,E", [(512, 2, 8), (2048, 8, 128), (7, 3, 5), (1, 1, 4)])
def test_tokens_per_expert(t, k, E):
    bal, worst = tokens_per_expert(t, k, E, "balanced"), tokens_per_expert(t, k, E, "worst")
    assert sum(bal) == sum(worst) == t * k and len(bal) == len(worst) == E
    assert max(bal) == math.ceil(t * k / E) and min(bal) == t * k // E
    assert sorted(worst, reverse=True) == [t] * k + [0] * (E - k)


@pytest.mark.parametrize("routing_rule", ["balanced", "worst"])
def test_trace_rule_gives_the_estimates_counts(routing_rule):
    import torch

    from peftplan.trace.moe import routed_indices

    t, k, E = 100, 2, 8
    idx = routed_indices(t, k, E, routing_rule)
    assert idx.shape == (t, k) and all(len(set(row.tolist())) == k for row in idx)  # k distinct experts per token
    counts = torch.bincount(idx.reshape(-1), minlength=E).tolist()
    assert sorted(counts) == sorted(tokens_per_expert(t, k, E, routing_rule))


def _tiny_mixtral():
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=64)
    torch.manual_seed(0)
    return MixtralForCausalLM(cfg)


@pytest.mark.parametrize("routing_rule", ["balanced", "worst"])
def test_forced_routing_reaches_the_experts_on_real_tensors(routing_rule):
    """A real CPU forward: the experts receive the rule's indices (not the router's own choice), and the
    router is restored afterwards."""
    import torch

    from peftplan.trace.moe import forced_routing, routed_indices

    model = _tiny_mixtral()
    seen = []
    hooks = [m.experts.register_forward_pre_hook(lambda mod, args: seen.append(args[1].clone()))
             for m in (layer.mlp for layer in model.model.layers)]
    ids = torch.randint(0, 64, (2, 5))
    with forced_routing(model, routing_rule) as n:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()  # top-k's saved indices were overwritten through .data: backward still runs
    assert n == 2 and len(seen) == 2
    want = routed_indices(10, 2, 4, routing_rule)
    assert all(torch.equal(s, want) for s in seen)
    assert all("forward" not in layer.mlp.gate.__dict__ for layer in model.model.layers)  # routers restored
    seen.clear()
    model(input_ids=ids)
    assert not torch.equal(seen[0], want)  # the router's own choice again (random weights: not the rule)
    for h in hooks:
        h.remove()


def test_estimate_routing_fields_and_equal_memory():
    card = registry()["qwen3-30b-a3b"]
    a = estimate(card, Plan(targets="q_proj,v_proj", batch_size=2, seq_len=512, moe_routing="balanced"))
    b = estimate(card, Plan(targets="q_proj,v_proj", batch_size=2, seq_len=512, moe_routing="worst"))
    assert a.moe.pairs == 1024 * 8 and a.moe.busiest_expert_tokens_balanced == 64
    assert a.moe.busiest_expert_tokens_worst == 1024 and b.moe.chosen == "worst"
    assert [m.tensor_bytes for m in a.phases] == [m.tensor_bytes for m in b.phases]  # grouped GEMM: S rows
    assert estimate("llama-3.2-1b").moe is None


def test_moe_card_facts():
    mix, qwen = registry()["mixtral-8x7b"], registry()["qwen3-30b-a3b"]
    assert (mix.n_experts, mix.experts_per_token, mix.expert_d_ff) == (8, 2, 14_336)
    assert (qwen.n_experts, qwen.experts_per_token, qwen.expert_d_ff) == (128, 8, 768)
    assert mix.router_norm_topk and mix.router_weights_fp32 and not mix.router_aux_loss
    assert qwen.router_norm_topk and not qwen.router_weights_fp32  # norm_topk_prob true in its config.json
    assert fused_experts(mix) and fused_experts(qwen)
    # the fused experts: 32 blocks × (8 × 3 × 14336 × 4096) of Mixtral's 46.7B
    assert expert_params(mix) == 32 * 8 * 3 * 14_336 * 4096 and total_params(mix) == 46_702_792_704


def test_qlora_on_fused_experts(capsys):
    from peftplan.cli import run_app

    card = registry()["mixtral-8x7b"]
    code = run_app(["estimate", "-m", "mixtral-8x7b", "--method", "qlora", "--targets", "q_proj,v_proj"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--no-kbit-prep" in err
    est = estimate(card, Plan(method="qlora", targets="q_proj,v_proj", kbit_prep=False))
    assert any("quantizes only Linears" in w for w in est.warnings)
    # NF4 only for the attention Linears; the experts stay bf16 (2 bytes each)
    assert est.params.quantized == 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024)
    assert est.phases[0].frozen_weights_bytes > 2 * expert_params(card)


def test_moe_routing_option_is_validated(capsys):
    from peftplan.cli import run_app

    code = run_app(["estimate", "-m", "mixtral-8x7b", "--targets", "q_proj,v_proj", "--moe-routing", "random"])
    err = capsys.readouterr().err
    assert code == 2 and "routing" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name,plan", [
    ("mixtral-8x7b", Plan(targets="q_proj,v_proj", batch_size=1, seq_len=128, moe_routing="balanced")),
    ("mixtral-8x7b", Plan(targets="q_proj,v_proj", batch_size=1, seq_len=128, moe_routing="worst")),
    ("qwen3-30b-a3b", Plan(method="full", batch_size=1, seq_len=64, grad_checkpointing=True)),
])
def test_moe_estimate_within_2pct_of_trace(name, plan):
    """One block of the full-width card, traced (the affine-in-blocks argument of random_check)."""
    from peftplan.trace.check import compare
    from peftplan.trace.run import trace

    card = cut(registry()[name], 1)
    c = compare(estimate(card, plan), trace(card, plan, steps=2))
    assert abs(c.peak_error) <= 0.02, c


@pytest.mark.slow
@pytest.mark.parametrize("name,plan", [
    ("mixtral-8x7b", Plan(targets="q_proj,v_proj", batch_size=1, seq_len=512)),
    ("qwen3-30b-a3b", Plan(targets="q_proj,k_proj,v_proj,o_proj", batch_size=1, seq_len=512, moe_routing="worst")),
])
def test_full_size_moe_trace(name, plan):
    """The whole Mixtral-8x7B / Qwen3-30B-A3B step on fake tensors (README figures)."""
    from peftplan.trace.check import compare
    from peftplan.trace.run import trace

    card = registry()[name]
    c = compare(estimate(card, plan), trace(card, plan))
    assert abs(c.peak_error) <= 0.02, c


def test_cut_generated_card_cuts_the_config_the_trace_builds():
    from peftplan.build import hf_config

    card = cut(registry()["mixtral-8x7b"], 2)
    config = hf_config(card)
    assert card.n_layers == 2 and config.num_hidden_layers == 2 and config.num_local_experts == 8
    gemma = hf_config(cut(registry()["gemma-3-1b"], 3))  # per-layer lists keep their first entries
    assert gemma.num_hidden_layers == 3 and len(gemma.layer_types) == 3
    assert gemma.layer_types == hf_config(registry()["gemma-3-1b"]).layer_types[:3]
    t5 = hf_config(cut(registry()["flan-t5-base"], 1))  # the decoder is the card's block list; the encoder stays
    assert t5.num_decoder_layers == 1 and t5.num_layers == hf_config(registry()["flan-t5-base"]).num_layers


def test_aux_loss_router_logits_term_matches_the_trace():
    """config.output_router_logits: the forward peak grows by the t×E tensor per block the load-balancing loss
    keeps, in the trace and in the estimate alike."""
    from peftplan.trace.run import trace

    base = cut(registry()["qwen3-30b-a3b"], 2)
    aux = dataclasses.replace(base, config=dict(base.config, output_router_logits=True), router_aux_loss=True)
    plan = Plan(targets="q_proj,v_proj", batch_size=4, seq_len=1024)
    traced = [trace(c, plan).phases[0].peak_bytes for c in (base, aux)]
    estimated = [estimate(c, plan).phases[0].tensor_bytes for c in (base, aux)]
    want = 2 * 4096 * 128 * 2  # blocks × t × E × bf16
    assert abs((traced[1] - traced[0]) - want) <= 4096 and estimated[1] - estimated[0] == want


def test_ours_refuses_lora_on_fused_experts():
    from peftplan.errors import PlanError
    from peftplan.trace.run import trace

    with pytest.raises(PlanError, match="impl peft"):
        trace(cut(registry()["mixtral-8x7b"], 1), Plan(targets="all-linear", seq_len=16), impl="ours")


def _forward_activations(card, plan) -> tuple[int, int]:
    from peftplan.trace.run import trace

    est = next(p for p in estimate(card, plan).phases if p.phase == "forward").activations_bytes
    got = next(p for p in trace(card, plan, steps=2).phases if p.phase == "forward").by_category_bytes
    return est, got.get("activations", 0)


@pytest.mark.parametrize("name,blocks,plan", [
    # DeepSeek-V2-Lite: multi-head latent attention (CUDA's memory-efficient SDPA, as the trace runs it), shared
    # experts, fp32 router; LoRA on q_proj, kv_b_proj (the latent up-projection) and o_proj (h·v wide)
    ("deepseek-v2-lite", 2, Plan(targets="q_proj,kv_b_proj,o_proj", batch_size=1, seq_len=256)),
    # gpt-oss: eager attention with sinks, clamped-SwiGLU experts with biases, top-k-then-softmax router
    ("gpt-oss-20b", 1, Plan(targets="q_proj,v_proj", batch_size=1, seq_len=256, attention="eager")),
])
def test_moe_block_activations_match_the_trace(name, blocks, plan):
    """One more MoE block adds what the trace's saved activations add, within 1% (cuts of k and k + 1 blocks:
    the peak at these sizes is the logits', so the per-block term is compared directly); and the whole forward
    activations of the k + 1 cut (DeepSeek-V2's dense first block included) within 2%."""
    e0, t0 = _forward_activations(cut(registry()[name], blocks), plan)
    e1, t1 = _forward_activations(cut(registry()[name], blocks + 1), plan)
    assert abs((e1 - e0) / (t1 - t0) - 1) <= 0.01, (e1 - e0, t1 - t0)
    assert abs(e1 / t1 - 1) <= 0.02, (e1, t1)


@pytest.mark.parametrize("field, value, needle", [
    ("n_experts", "-3", "n_experts must be in"), ("router_norm_topk", '"x"', "router_norm_topk must be true or false"),
    ("experts_per_token", "99", "exceeds n_experts"), ("qk_norm", "3", "qk_norm must be true or false")])
def test_bad_moe_and_structure_card_fields_are_one_line_exit_2(tmp_path, field, value, needle):
    """The structure facts of generated cards go through the one validation layer (planning/validate.py)."""
    import re
    import subprocess
    import sys

    from peftplan.planning.cards import MODELS_DIR

    text = (MODELS_DIR / "mixtral-8x7b.toml").read_text()
    text = re.sub(rf"(?m)^{field} = .*$", f"{field} = {value}", text) if re.search(rf"(?m)^{field} = ", text) \
        else text.replace("\nname = ", f"\n{field} = {value}\nname = ", 1)
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    r = subprocess.run([sys.executable, "-m", "peftplan", "estimate", "--model", str(bad), "--targets", "q_proj"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr
