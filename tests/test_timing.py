"""Step FLOPs against a hand count and the fake-tensor trace; the roofline against published throughput; cost."""
from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest

from peftplan.measure.tiny import tiny_card
from peftplan.plan import Plan
from peftplan.planning import estimate, timing
from peftplan.planning.gpus import load_gpu

ROOT = Path(__file__).resolve().parents[1]

# tiny llama: d 64, L 2, h 4, h_kv 2, d_h 16, d_ff 128, V 128; b 2 × s 16 → T = 32
T = 32
W_Q, W_K, W_V, W_O, W_FF = 64 * 64, 64 * 32, 64 * 32, 64 * 64, 64 * 128  # weight sizes
BLOCK = W_Q + W_K + W_V + W_O + 3 * W_FF  # 36,864
HEAD = 128 * 64
N = 2 * BLOCK + HEAD  # 81,920
LORA_QV = 16 * (64 + 64) + 16 * (64 + 32)  # r 16 on q and v: 3,584 per block
ADAPTERS = 2 * 2 * 64 * 64  # two Houlsby adapters per block, m = 64 = d: 16,384 per block


def hand_count(method: str, ck: bool) -> int:
    """Matmul FLOPs of one step (fused attention excluded), counted here from the shapes, 2·T per weight."""
    if method == "full":
        per = 3 * N  # forward, dX, dW of everything
        if ck:
            per += 2 * (BLOCK - W_FF)  # each block's forward again, but the final down_proj (early stop)
    elif method in ("lora", "qlora"):
        fwd = N + 2 * LORA_QV
        dx = HEAD + BLOCK + (BLOCK - W_Q - W_K - W_V)  # block 0's q, k, v inputs need no gradient
        lora_bwd = 2 * LORA_QV + 2 * 16 * (64 + 32) + 16 * (64 + 64)  # dW; dX through B (both blocks), A (block 1)
        per = fwd + dx + lora_bwd
        if ck:  # embedding output requires grad: block 0's q, k, v and A inputs too; recompute but down_proj
            per += (W_Q + W_K + W_V) + 16 * (64 + 64) + 2 * (BLOCK - W_FF + LORA_QV)
    elif method == "adapter":  # every norm trains, so every input needs a gradient
        per = (N + 2 * ADAPTERS) + N + 2 * ADAPTERS + 2 * ADAPTERS
        if ck:  # recompute but the last adapter's up product
            per += 2 * (BLOCK + ADAPTERS - 64 * 64)
    elif method == "top":  # top_k = 1: the last block trains
        per = N + (HEAD + BLOCK) + BLOCK
        if ck:  # every block propagates dX (embedding output requires grad), every block recomputes
            per += BLOCK + 2 * (BLOCK - W_FF)
    else:
        raise AssertionError(method)
    return 2 * T * per


PLAN = dict(batch_size=2, seq_len=16, top_k=1, attention="sdpa")


@pytest.mark.parametrize("ck", [False, True])
@pytest.mark.parametrize("method", ["full", "lora", "qlora", "adapter", "top"])
def test_flops_hand_count(method, ck):
    f = timing.step_flops(tiny_card("llama"), Plan(method=method, grad_checkpointing=ck, **PLAN))
    assert f.matmul == hand_count(method, ck)


def test_attention_flops_causal_half_for_fused_kernels():
    card = tiny_card("llama")
    s, b, d_q, L = 16, 2, 64, 2
    fused = timing.step_flops(card, Plan(method="full", **PLAN))
    eager = timing.step_flops(card, Plan(method="full", **{**PLAN, "attention": "eager"}))
    assert eager.attention_forward == 4 * b * s * s * d_q * L  # QKᵀ and P·V over every pair
    assert fused.attention_forward == 4 * b * (s * (s + 1) // 2) * d_q * L  # causal: s(s+1)/2 pairs
    assert fused.attention_backward == 2.5 * fused.attention_forward  # FlashAttention-2 recomputes QKᵀ
    assert eager.attention_backward == 2 * eager.attention_forward


CASES = [(fam, m, ck, "sdpa") for fam in ("llama",) for m in ("full", "lora", "qlora", "adapter", "top")
         for ck in (False, True)]
CASES += [("gpt2", "lora", True, "eager"), ("opt", "full", True, "eager"), ("bert", "adapter", True, "sdpa"),
          ("gemma2", "qlora", True, "eager"), ("qwen2", "top", False, "eager"), ("phi3", "adapter", False, "sdpa")]


@pytest.mark.parametrize("family,method,ck,attention", CASES)
def test_flops_match_trace(family, method, ck, attention):
    """Sum of 2·m·n·k over the traced mm/addmm/bmm (and bitsandbytes' fused 4-bit GEMM) of one step within 1%.
    Fused SDPA is one aten op, not a matmul: the trace sees eager attention's bmm only."""
    from peftplan.trace.flops import trace_flops

    card = tiny_card(family, dropout=family in ("gpt2", "opt"))
    plan = Plan(method=method, grad_checkpointing=ck, **{**PLAN, "attention": attention})
    traced = trace_flops(card, plan)
    f = timing.step_flops(card, plan)
    predicted = f.matmul + (f.attention if attention == "eager" else 0)
    assert traced.total > 0 and abs(predicted - traced.total) <= 0.01 * traced.total, (predicted, traced)
    assert traced.optimizer == 0


# ---------------------------------------------------------------- published throughput


def _published():
    spec = importlib.util.spec_from_file_location("published_throughput",
                                                  ROOT / "benchmarks" / "published_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["published_throughput"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    if not mod.PUBLISHED.exists():
        pytest.skip("the published measurements are not on this machine")
    return mod


def test_published_throughput_within_bounds():
    pub = _published()
    cases, skipped = pub.throughput_cases(pub.load_rows())
    results = {r.case.row_id: r for r in pub.throughput_results(cases)}
    for rid in ("fms_mistral7b_full_bs4", "fms_mistral7b_lora_bs4", "fms_mistral7b_qlora_bs4"):
        assert results[rid].role == "check" and abs(results[rid].error) <= 0.15, (rid, results[rid].error)
    checks = [abs(r.error) for r in results.values() if r.role == "check"]
    assert len(checks) >= 3 and max(checks) <= 0.25 and statistics.median(checks) <= 0.10
    assert {r for r in results if results[r].role == "fit"} == set(timing.FIT_ROWS)
    assert all(reason for _, reason in skipped)


def test_published_fit_reproduces_constants():
    pub = _published()
    cases, _ = pub.throughput_cases(pub.load_rows())
    assert pub.fit_efficiency(cases) == timing.EFFICIENCY


# ---------------------------------------------------------------- roofline and cost


def test_cost_from_roofline_time():
    est = estimate("mistral-7b-v0.1", method="qlora", batch_size=4, seq_len=2048, gpu="a100-80gb", tokens=10**8)
    t, g = est.time, load_gpu("a100-80gb")
    assert t.step_time_s == pytest.approx(t.gemm_s + t.attention_s + t.memory_s + t.optimizer_s)
    assert t.tokens_per_s == pytest.approx(4 * 2048 / t.step_time_s)
    assert t.gpu_hours == pytest.approx(10**8 / t.tokens_per_s / 3600)
    assert t.cost_usd == pytest.approx(t.gpu_hours * g.price_per_hour_usd)
    assert t.mem_bandwidth_gbs == g.mem_bandwidth_gbs and 0 < t.utilisation < 1


def test_roofline_orders():
    card = tiny_card("llama")
    base = Plan(method="lora", batch_size=4, seq_len=512)
    fast = timing.phase_seconds(card, base, 312, 2039)
    slow_bw = timing.phase_seconds(card, base, 312, 1000)
    assert slow_bw.memory > fast.memory and slow_bw.gemm >= fast.gemm
    q = timing.phase_seconds(card, base.with_(method="qlora"), 312, 2039)
    assert q.memory > fast.memory  # dequantization of every NF4 weight on every use
    full = timing.phase_seconds(card, base.with_(method="full"), 312, 2039)
    assert full.optimizer > fast.optimizer and full.gemm > fast.gemm


def test_fit_ranks_by_cost():
    from peftplan.planning.fit import fit_matrix

    gpus = ("a100-80gb", "h100-sxm", "rtx4090", "l4")
    fm = fit_matrix(["llama-3.2-1b"], gpus, ["lora"], seq_len=512)
    ranked = fm.by_cost("llama-3.2-1b", "lora")
    assert len(ranked) == 4
    costs = [c.usd_per_million_tokens for c in ranked]
    assert costs == sorted(costs)
    top = ranked[0]
    est = estimate("llama-3.2-1b", method="lora", batch_size=top.largest_batch, seq_len=512, gpu=top.gpu,
                   tokens=10**6)
    assert top.usd_per_million_tokens == pytest.approx(est.time.cost_usd)


def test_reentrant_checkpointing_recomputes_the_whole_block():
    """use_reentrant=True re-runs each block's forward to its end; non-reentrant stops before down_proj."""
    card, plan = tiny_card("llama"), Plan(method="lora", grad_checkpointing=True, **PLAN)
    early = timing.step_flops(card, plan)
    whole = timing.step_flops(card, plan, timing.Stack(reentrant=True))
    assert whole.recompute - early.recompute == 2 * T * 2 * W_FF  # down_proj in each of the 2 blocks
    assert whole.attention == early.attention and whole.forward == early.forward


def test_published_throughput_parsing():
    pub = _published()
    rows = {r["id"]: r for r in pub.load_rows()}
    assert pub.published_tokens_per_s(rows["fms_mistral7b_lora_bs4"]) == pytest.approx(3324.155)
    assert pub.published_tokens_per_s(rows["torchtune_2409_llama31_8b_lora_4090"]) == 3083
    # Qwen: s/it per optimizer step of 8 micro-batches of 1 × L tokens
    assert pub.published_tokens_per_s(rows["qwen_7b_chat_lora_r64_all_L1024"]) == pytest.approx(8 * 1024 / 2.8)
    assert pub.published_tokens_per_s(rows["litgpt_rt_phi15_lora_mbs1"]) is None
    assert pub.throughput_case(rows["fms_santacoder_full_bs4"]).startswith("no card yet")
