"""Benchmark: the analytic estimate against the fake-tensor trace over a grid of full-size cards.

Issue 4's target: every configuration's peak within 2% of the trace. Prints per-configuration errors and the
summary (median, p90, max), and writes them to benchmarks/results/check_grid.json. One failure never loses the
others: it is listed with its reason.

    python benchmarks/check_grid.py            # the full grid (~230 configurations, ~45 min on 2 cores)
    python benchmarks/check_grid.py --quick    # a few configurations per family
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from peftplan.planning.cards import registry
from peftplan.trace.check import grid, run_grid, save_grid, summarize

OUT = Path(__file__).resolve().parent / "results" / "check_grid.json"


def configurations(quick: bool) -> list:
    small = [registry()[n] for n in ("opt-125m", "llama-3.2-1b", "qwen2.5-0.5b", "gpt2", "bert-base")]
    if quick:
        return grid(small[:3], ranks=(8,), batches=(2,), seqs=(256,), checkpointing=(False, True), attentions=("sdpa",))
    # families × methods × batch × sequence × checkpointing (SDPA, AdamW)
    configs = grid(small, ranks=(16,), batches=(1, 4), seqs=(128, 512), checkpointing=(False, True),
                   attentions=("sdpa",))
    # LoRA rank sweep, eager attention, other optimizers
    configs += grid(small[1:2], methods=("lora", "qlora"), ranks=(1, 64, 256), batches=(2,), seqs=(256,),
                    checkpointing=(False, True), attentions=("sdpa",))
    configs += grid(small, methods=("full", "lora", "qlora"), ranks=(16,), batches=(2,), seqs=(256,),
                    checkpointing=(False,), attentions=("eager",))
    configs += grid(small[:3], methods=("full", "lora", "qlora"), ranks=(16,), batches=(2,), seqs=(256,),
                    checkpointing=(False,), attentions=("sdpa",), optimizers=("adamw8bit", "sgd-momentum"))
    # Gemma-2 (eager only in transformers 5) and full-size 7-8B cards
    configs += grid([registry()["gemma-2-2b"]], methods=("full", "adapter", "lora", "qlora"), ranks=(16,),
                    batches=(1,), seqs=(256,), checkpointing=(False, True), attentions=("eager",))
    configs += grid([registry()[n] for n in ("opt-6.7b", "llama-2-7b", "llama-3.1-8b", "qwen2.5-7b")],
                    methods=("full", "adapter", "lora", "qlora"), ranks=(16,), batches=(4,), seqs=(512,),
                    checkpointing=(False, True), attentions=("sdpa",))
    return configs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    configs = configurations(args.quick)
    t0 = time.perf_counter()
    labelled = [(f"{card.name} {plan.method} r={plan.r} b={plan.batch_size} s={plan.seq_len} "
                 f"gc={'on' if plan.grad_checkpointing else 'off'} {plan.attention} {plan.optimizer}", card, plan)
                for card, plan in configs]
    run = run_grid(labelled)
    results, failures, rows = run.results, run.failures, run.rows
    s = summarize(results, failures)
    print(save_grid(args.out, s, rows, time.perf_counter() - t0))
    worst = sorted(rows, key=lambda r: -abs(r["peak_error"]))[:10]
    for r in worst:
        print(f"  {100 * r['peak_error']:+.2f}%  {r['config']}")


if __name__ == "__main__":
    main()
