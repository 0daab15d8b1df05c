"""The estimate's per-GPU peak against the FSDP2 step traced on a fake process group (rank 0's live bytes).

    python benchmarks/check_distributed.py [--quick]

Each configuration: `peftplan.trace.run.trace` with `--strategy fsdp*` (PyTorch's fully_shard, fake backend,
fake tensors) vs `estimate()`; per phase and at the peak, signed error (estimate − trace) / trace. Large cards
are cut to a few blocks (`n_layers`): the per-block terms and the root are what sharding changes, and a cut card
keeps both exact. Writes benchmarks/results/check_distributed.json (atomically) and prints median/max |error|.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path


def grid(quick: bool):
    """Each card cut to 3 blocks (the least that has a middle block in backward: one unsharded, the next
    prefetched, the previous one's reduce-scatter input): every block is its own FSDP unit of the same shape, so the terms sharding adds
    (one block unsharded, the root, the per-block gradients and states) are those of the full card exactly and
    only the count of blocks changes; the root (embeddings, head) is uncut. QLoRA as in the FSDP+QLoRA recipe:
    the packed NF4 storage sharded like any parameter, quant states kept per module."""
    from peftplan.plan import Plan

    cards = ["llama-3.2-1b", "qwen2.5-0.5b", "llama-2-7b", "llama-3.1-70b"]
    runs = (("fsdp", 2, 1, False), ("fsdp", 8, 1, True), ("fsdp-grad-op", 4, 1, False), ("fsdp-hybrid", 8, 2, True))
    if quick:
        cards, runs = cards[:2], runs[:2]
    for model in cards:
        for method in ("full", "lora", "qlora"):
            for strategy, gpus, nodes, ckpt in runs:
                yield model, 3, Plan(method=method, gpus=gpus, nodes=nodes, strategy=strategy, batch_size=1,
                                     seq_len=256, grad_checkpointing=ckpt)


def main() -> None:
    from peftplan.planning import estimate
    from peftplan.planning.cards import load_card
    from peftplan.trace.run import trace

    quick = "--quick" in sys.argv
    rows = []
    for model, cut, plan in grid(quick):
        card = load_card(model)
        if cut:
            card = replace(card, n_layers=cut, name=f"{model}[{cut} blocks]")
        t = time.perf_counter()
        try:
            tr = trace(card, plan, steps=2)
        except Exception as e:  # noqa: BLE001 - a failing configuration is a row with its reason
            rows.append({"model": card.name, "plan": plan.to_dict(), "error": f"{type(e).__name__}: {e}"[:200]})
            print(f"{card.name} {plan.method} {plan.strategy} W={plan.gpus}: FAILED {e}", flush=True)
            continue
        est = estimate(card, plan)
        peak_err = (est.peak.tensor_bytes - tr.peak_bytes) / tr.peak_bytes
        rows.append({"model": card.name, "plan": plan.to_dict(), "trace_peak_bytes": tr.peak_bytes,
                     "estimate_peak_bytes": est.peak.tensor_bytes, "error": peak_err,
                     "seconds": time.perf_counter() - t})
        print(f"{card.name:24s} {plan.method:5s} {plan.strategy:12s} W={plan.gpus} ckpt={int(plan.grad_checkpointing)} "
              f"trace {tr.peak_bytes / 2**30:7.3f} GiB est {est.peak.tensor_bytes / 2**30:7.3f} "
              f"{100 * peak_err:+6.2f}%", flush=True)
    errs = [abs(r["error"]) for r in rows if isinstance(r["error"], float)]
    if errs:
        print(f"{len(errs)} configurations: median |error| {100 * statistics.median(errs):.2f}%, "
              f"max {100 * max(errs):.2f}%; within 3%: {sum(e <= 0.03 for e in errs)}")
    out = Path(__file__).parent / "results" / "check_distributed.json"
    out.parent.mkdir(exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=1))
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
