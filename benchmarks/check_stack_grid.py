"""Benchmark: the estimate against the peft-built fake-tensor trace over the stack options (issue 12).

Every configuration sets at least one of the new options: LoRA adapters in fp32 (peft's default) or bf16,
the Trainer's autocast (mixed precision over fp32 weights, bf16 autocast over bf16 or 4-bit),
gradient accumulation, clipping off, flash attention, non-reentrant/reentrant checkpointing, LoRA dropout.
Cards are shipped cards cut to 2 blocks (same per-block shapes). Writes benchmarks/results/check_stack_grid.json.

    python benchmarks/check_stack_grid.py          # ~300 configurations
    python benchmarks/check_stack_grid.py --new-only --out benchmarks/results/check_stack_grid_new.json
                                                   # the 64 DoRA / old-loss ones (new_configurations)
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import time
from pathlib import Path

from peftplan.errors import PlanError
from peftplan.plan import Plan
from peftplan.planning import estimate
from peftplan.planning.cards import registry
from peftplan.trace.check import compare, save_grid, summarize
from peftplan.trace.run import trace

OUT = Path(__file__).resolve().parent / "results" / "check_stack_grid.json"
CARDS = ("opt-125m", "llama-3.2-1b", "qwen2.5-0.5b", "gpt2")


def configurations() -> list:
    cards = [dataclasses.replace(registry()[n], n_layers=2, name=f"{n}-2L") for n in CARDS]
    out = []
    for card, method, adt, accum, attn, gc in itertools.product(
            cards, ("lora", "qlora"), ("fp32", "bf16"), (1, 2), ("sdpa", "flash"), (False, True)):
        out.append((card, Plan(method=method, adapter_dtype=adt, grad_accum=accum, attention=attn,
                               grad_checkpointing=gc, batch_size=2, seq_len=256, r=16)))
    for card, accum, clip, gc in itertools.product(cards, (1, 2, 4), (1.0, 0.0), (False, True)):
        out.append((card, Plan(method="full", grad_accum=accum, max_grad_norm=clip, grad_checkpointing=gc,
                               batch_size=2, seq_len=256)))
    # the Trainer's autocast: mixed precision (fp32 weights) and bf16 weights / a 4-bit base under bf16 autocast
    for card, method, gc in itertools.product(cards, ("full", "lora", "qlora"), (False, True)):
        for dtype in (("fp32", "bf16") if method != "qlora" else ("bf16",)):
            out.append((card, Plan(method=method, dtype=dtype, autocast="bf16", grad_checkpointing=gc,
                                   batch_size=2, seq_len=256, targets="all-linear" if method == "lora" else None)))
    for card in cards:
        out.append((card, Plan(method="qlora", autocast="bf16", kbit_prep=False, batch_size=2, seq_len=256)))
        out.append((card, Plan(method="lora", dtype="fp32", autocast="fp16", grad_accum=2, batch_size=2,
                               seq_len=256)))
    for card, drop, targets in itertools.product(cards[:3], (0.1,), (None, "all-linear")):
        for kbit in (True, False):
            out.append((card, Plan(method="qlora", dropout=drop, targets=targets, kbit_prep=kbit, batch_size=2,
                                   seq_len=256)))
    return out + new_configurations(cards)


def new_configurations(cards: list) -> list:
    """DoRA (peft's use_dora, LoRA and QLoRA) and transformers <= 4.48's loss (the shifted logits' fp32 copy)."""
    out = []
    for card, adt, gc, drop in itertools.product(cards, ("fp32", "bf16"), (False, True), (0.0, 0.1)):
        out.append((card, Plan(method="lora", use_dora=True, adapter_dtype=adt, grad_checkpointing=gc, dropout=drop,
                               batch_size=2, seq_len=256, targets="all-linear" if gc else None)))
    for card, kbit, gc in itertools.product(cards, (True, False), (False, True)):
        out.append((card, Plan(method="qlora", use_dora=True, kbit_prep=kbit, grad_checkpointing=gc, autocast="bf16",
                               batch_size=2, seq_len=256, targets="all-linear" if gc else None)))
    for card in cards:
        out.append((card, Plan(method="lora", use_dora=True, dtype="fp32", autocast="bf16", batch_size=2, seq_len=256)))
        out.append((card, Plan(method="lora", use_dora=True, dtype="fp32", autocast="fp16", batch_size=1, seq_len=32,
                               dropout=0.1, targets="all-linear")))  # few tokens: the weight norm's working set
        out.append((card, Plan(method="lora", logits_shift_copy=True, batch_size=2, seq_len=256)))
        out.append((card, Plan(method="qlora", autocast="bf16", grad_checkpointing=True, kbit_prep=False,
                               logits_shift_copy=True, batch_size=2, seq_len=256)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--new-only", action="store_true", help="only DoRA and the old loss (new_configurations)")
    args = ap.parse_args()
    configs = configurations()
    if args.new_only:
        configs = new_configurations([dataclasses.replace(registry()[n], n_layers=2, name=f"{n}-2L") for n in CARDS])
    configs = configs[: args.limit or None]
    results, failures, rows = [], [], []
    t0 = time.perf_counter()
    for i, (card, plan) in enumerate(configs, 1):
        p = plan
        label = (f"{card.name} {p.method} adapter={p.adapter_dtype} accum={p.grad_accum} clip={p.max_grad_norm} "
                 f"{p.attention} gc={'on' if p.grad_checkpointing else 'off'} drop={p.dropout} t={p.targets} "
                 f"kbit={p.kbit_prep} {p.dtype}+autocast={p.autocast}" + (" dora" if p.use_dora else "")
                 + (" shift-copy" if p.logits_shift_copy else ""))
        try:
            tr = trace(card, plan)
            c = compare(estimate(card, plan), tr)
        except PlanError as e:
            failures.append(f"{label}: {e}")
            print(f"[{i}/{len(configs)}] FAIL {label}: {e}", flush=True)
            continue
        results.append(c)
        rows.append({"config": label, "impl": tr.impl, "peak_error": c.peak_error, "phase": c.trace_phase,
                     "trace_peak_bytes": c.trace_peak_bytes, "estimate_peak_bytes": c.estimate_peak_bytes})
        print(f"[{i}/{len(configs)}] {'ok ' if abs(c.peak_error) <= 0.02 else 'OUT'} {label} ({tr.impl}): "
              f"{100 * c.peak_error:+.2f}% ({c.trace_phase}, {c.trace_seconds:.1f} s)", flush=True)
    s = summarize(results, failures)
    print(save_grid(args.out, s, rows, time.perf_counter() - t0))
    for r in sorted(rows, key=lambda r: -abs(r["peak_error"]))[:8]:
        print(f"  {100 * r['peak_error']:+.2f}%  {r['config']}")


if __name__ == "__main__":
    main()
