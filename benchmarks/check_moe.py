"""Benchmark: the estimate against the fake-tensor trace on mixture-of-experts cards (issue 11, part 3).

Mixtral-8x7B, Qwen3-30B-A3B and DeepSeek-V2-Lite generated cards, every width and the vocabulary kept, cut to 2, 8
and 3 blocks (the trace's peaks are affine in the number of blocks; Qwen3's 151,936-entry vocabulary needs more
blocks before the experts outweigh the logits; DeepSeek-V2-Lite keeps its dense first block, multi-head latent
attention and shared experts; on it q_proj,v_proj wraps q_proj alone, and q,k,v,o wraps q_proj and o_proj;
gpt-oss-20b cut to 2 blocks, a sliding and a full-attention one, in eager attention with its sinks) × routing (balanced, worst: the trace forces each, peftplan/trace/moe.py) × LoRA on
attention (q,v; q,k,v,o), LoRA all-linear (peft reaches the router and the fused experts), QLoRA (--no-kbit-prep:
the fused experts stay bf16), full fine-tuning × checkpointing on/off at b=4, s=1024; plus r = 64 at s = 2048 and
QLoRA all-linear. Prints each configuration's error and the summary; writes benchmarks/results/check_moe.json.
`--full-size` instead traces the whole Mixtral-8x7B and Qwen3-30B-A3B (the README's figures).

    python benchmarks/check_moe.py              # 92 configurations
    python benchmarks/check_moe.py --quick      # 8
    python benchmarks/check_moe.py --full-size  # 5 full-size traces
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peftplan.plan import Plan  # noqa: E402
from peftplan.planning.cards import registry  # noqa: E402
from peftplan.trace.check import run_grid, save_grid, summarize  # noqa: E402
from peftplan.trace.random_check import cut  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "check_moe.json"
# card: blocks kept (DeepSeek-V2-Lite: its dense first block and two MoE blocks)
CARDS = {"mixtral-8x7b": 2, "qwen3-30b-a3b": 8, "deepseek-v2-lite": 3, "gpt-oss-20b": 2}
ATTENTION = {"gpt-oss-20b": "eager"}  # transformers runs gpt-oss's attention sinks in eager attention only
ROUTINGS = ("balanced", "worst")
ATTN, QKVO = dict(method="lora", targets="q_proj,v_proj"), dict(method="lora", targets="q_proj,k_proj,v_proj,o_proj")
METHODS = (ATTN, QKVO, dict(method="lora", targets="all-linear"),
           dict(method="qlora", targets="q_proj,v_proj", kbit_prep=False), dict(method="full"))


def configurations(quick: bool) -> list:
    cards = [cut(registry()[n], k) for n, k in CARDS.items()]
    def plan(card, **kw) -> Plan:
        return Plan(attention=ATTENTION.get(card.name, "sdpa"), **kw)

    if quick:
        return [(c, plan(c, batch_size=2, seq_len=256, moe_routing=r, **ATTN)) for c in cards for r in ROUTINGS]
    out = []
    for card, routing, m, gc in itertools.product(cards, ROUTINGS, METHODS, (False, True)):
        out.append((card, plan(card, batch_size=4, seq_len=1024, grad_checkpointing=gc, moe_routing=routing, **m)))
    for card, routing in itertools.product(cards, ROUTINGS):
        out.append((card, plan(card, r=64, batch_size=1, seq_len=2048, moe_routing=routing, **QKVO)))
    for card in cards:
        out.append((card, plan(card, method="qlora", targets="all-linear", kbit_prep=False, batch_size=4,
                               seq_len=1024, grad_checkpointing=True)))
    return out


def full_size() -> list:
    """The whole models, as a user would trace them (b=1, s=512)."""
    mix, qwen = registry()["mixtral-8x7b"], registry()["qwen3-30b-a3b"]
    return [(mix, Plan(batch_size=1, seq_len=512, **ATTN)),
            (mix, Plan(batch_size=1, seq_len=512, moe_routing="worst", **ATTN)),
            (mix, Plan(method="qlora", targets="q_proj,v_proj", kbit_prep=False, batch_size=1, seq_len=512,
                       grad_checkpointing=True)),
            (qwen, Plan(batch_size=1, seq_len=512, **QKVO)),
            (qwen, Plan(batch_size=4, seq_len=1024, grad_checkpointing=True, **ATTN))]


def label(card, plan: Plan) -> str:
    extra = "" if plan.kbit_prep else " no-kbit-prep"
    return (f"{card.name}[{card.n_layers} blocks] {plan.method} {plan.targets or ''} r={plan.r} b={plan.batch_size} "
            f"s={plan.seq_len} gc={'on' if plan.grad_checkpointing else 'off'} {plan.moe_routing}{extra}"
            + (f" {plan.attention}" if plan.attention != "sdpa" else ""))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--full-size", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    configs = full_size() if args.full_size else configurations(args.quick)
    args.out = args.out or (OUT.with_name("check_moe_full_size.json") if args.full_size else OUT)
    t0 = time.perf_counter()
    run = run_grid([(label(card, plan), card, plan) for card, plan in configs])
    results, failures, rows = run.results, run.failures, run.rows
    s = summarize(results, failures)
    print(save_grid(args.out, s, rows, time.perf_counter() - t0))


if __name__ == "__main__":
    main()
