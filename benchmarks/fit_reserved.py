"""Benchmark: fit the estimate's reserved/allocated relation from caching-allocator replays over the check grid.

For each configuration: the fake-tensor trace (2 steps, fixed shapes) with its allocation events, replayed
through peftplan.planning.allocator (default options and expandable_segments:True). The relation the estimate
uses (peftplan/planning/memory.py, RESERVED_PER_LIVE) is ρ = max reserved / max live bytes of the step,
grouped by the phase that holds the live peak; this prints ρ's median, p90 and max per phase and per method, and
writes every row to benchmarks/results/reserved_fit.jsonl (appended as it goes, so a partial run counts).

    python benchmarks/fit_reserved.py            # small cards + 7B cards (~150 configurations)
    python benchmarks/fit_reserved.py --quick    # a dozen configurations
    python benchmarks/fit_reserved.py --summary  # only summarise the rows already written
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "reserved_fit.jsonl"


def configurations(quick: bool) -> list:
    from peftplan.planning.cards import registry
    from peftplan.trace.check import grid

    reg = registry()
    small = [reg[n] for n in ("opt-125m", "llama-3.2-1b", "qwen2.5-0.5b", "gpt2")]
    if quick:
        return grid(small[:2], ranks=(16,), batches=(2,), seqs=(256,), checkpointing=(False, True), attentions=("sdpa",))
    # the 7B points first (the published rows are 7B, packed 4096), then the small cards
    configs = grid([reg["mistral-7b-v0.1"]], methods=("full", "lora", "qlora"), ranks=(16,), batches=(4,),
                   seqs=(4096,), checkpointing=(True,), attentions=("sdpa",))
    configs += grid([reg["llama-2-7b"], reg["mistral-7b-v0.1"]], ranks=(16,), batches=(4,), seqs=(512,),
                    checkpointing=(False, True), attentions=("sdpa",))
    configs += grid(small, ranks=(16,), batches=(1, 4), seqs=(128, 512), checkpointing=(False, True),
                    attentions=("sdpa",))
    return configs


def row(card, plan) -> dict:
    from peftplan.planning.allocator import AllocatorConfig
    from peftplan.planning.replay import replay
    from peftplan.trace.run import trace

    tr = trace(card, plan, record_events=True)
    out = {"model": card.name, "method": plan.method, "b": plan.batch_size, "s": plan.seq_len,
           "gc": plan.grad_checkpointing, "trace_peak_bytes": tr.peak_bytes, "peak_phase": tr.peak.phase,
           "events": len(tr.events)}
    for name, conf in (("default", AllocatorConfig()), ("expandable", AllocatorConfig(expandable_segments=True))):
        rp = replay(tr.events, conf)
        out[name] = {"peak_live_bytes": rp.peak_live_bytes, "peak_allocated_bytes": rp.peak_allocated_bytes,
                     "peak_reserved_bytes": rp.peak_reserved_bytes, "replay_seconds": round(rp.seconds, 3),
                     "fragmentation": round(rp.peak.fragmentation, 4)}
    return out


def summarize(rows: list[dict], key: str = "default") -> dict:
    """ρ = reserved / live per peak phase and per method: n, median, p90, max."""
    def stats(values: list[float]) -> dict:
        v = sorted(values)
        return {"n": len(v), "median": round(statistics.median(v), 4), "p90": round(v[int(0.9 * (len(v) - 1))], 4),
                "max": round(v[-1], 4)}

    def rho(r: dict) -> float:
        return r[key]["peak_reserved_bytes"] / r[key]["peak_live_bytes"]

    out = {"by_phase": {}, "by_method": {}}
    for group, field in (("by_phase", "peak_phase"), ("by_method", "method")):
        for name in sorted({r[field] for r in rows}):
            out[group][name] = stats([rho(r) for r in rows if r[field] == name])
    out["all"] = stats([rho(r) for r in rows])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--summary", action="store_true")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if not args.summary:
        from peftplan.errors import PlanError

        done = set()
        if args.out.exists():
            done = {(r["model"], r["method"], r["b"], r["s"], r["gc"])
                    for r in map(json.loads, args.out.read_text().splitlines())}
        configs = configurations(args.quick)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        for i, (card, plan) in enumerate(configs, 1):
            key = (card.name, plan.method, plan.batch_size, plan.seq_len, plan.grad_checkpointing)
            if key in done:
                continue
            try:
                r = row(card, plan)
            except PlanError as e:
                print(f"[{i}/{len(configs)}] FAIL {key}: {e}", flush=True)
                continue
            with args.out.open("a") as f:
                f.write(json.dumps(r) + "\n")
            d = r["default"]
            print(f"[{i}/{len(configs)}] {key}: reserved/live {d['peak_reserved_bytes'] / d['peak_live_bytes']:.3f} "
                  f"(expandable {r['expandable']['peak_reserved_bytes'] / d['peak_live_bytes']:.3f}), "
                  f"{r['events']} events, replay {d['replay_seconds']} s", flush=True)
        print(f"{time.perf_counter() - t0:.0f} s")
    rows = [json.loads(x) for x in args.out.read_text().splitlines()]
    for key in ("default", "expandable"):
        print(f"\n{key}: {json.dumps(summarize(rows, key), indent=1)}")


if __name__ == "__main__":
    main()
