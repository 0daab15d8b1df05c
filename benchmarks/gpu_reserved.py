"""GPU check of the caching-allocator replay (issue 20, part 4): max reserved and segment layouts, model vs torch.

For each point (card, plan, sequence lengths per step) on a CUDA device:
  1. run the shared training step for every length with `torch.cuda.memory._record_memory_history()` on, and
     read `torch.cuda.max_memory_reserved()` and `torch.cuda.memory._snapshot()` (segments, device trace);
  2. replay the REAL allocation stream of that run (the snapshot's alloc / free_completed entries) through
     peftplan.planning.allocator: this isolates the allocator rules from the trace — reserved and the
     segment sizes must agree exactly if the rules are right;
  3. replay the fake-tensor trace of the same steps (what `peftplan trace --reserved` reports): the
     end-to-end error of the prediction.
Writes DIR/reserved.json; prints one line per point.

    python benchmarks/gpu_reserved.py --out DIR [--budget-s 150]
    python benchmarks/gpu_reserved.py --out DIR --dry-run   # CPU: the trace's own events stand in for the GPU's
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peftplan.plan import Plan  # noqa: E402
from peftplan.planning.allocator import AllocatorConfig  # noqa: E402
from peftplan.planning.cards import load_card  # noqa: E402
from peftplan.planning.replay import replay  # noqa: E402

MiB = 2**20
# (card, plan, lengths per step, PYTORCH_CUDA_ALLOC_CONF): fixed shapes first, then varying lengths
POINTS = [
    ("opt-125m", Plan(method="full", batch_size=4, seq_len=512), (512, 512, 512), ""),
    ("opt-125m", Plan(method="lora", batch_size=4, seq_len=512), (512, 512, 512), ""),
    ("opt-125m", Plan(method="lora", batch_size=4, seq_len=512), (512, 512, 512), "expandable_segments:True"),
    ("opt-125m", Plan(method="full", batch_size=4, seq_len=512), (256, 512, 384, 512, 448), ""),
    ("llama-3.2-1b", Plan(method="lora", batch_size=4, seq_len=512), (512, 512, 512), ""),
    ("llama-3.2-1b", Plan(method="full", batch_size=2, seq_len=512), (512, 512, 512), ""),
    ("llama-3.2-1b", Plan(method="lora", batch_size=2, seq_len=2048), (512, 2048, 1024, 1536, 2048), ""),
    ("llama-3.2-1b", Plan(method="lora", batch_size=2, seq_len=2048), (512, 2048, 1024, 1536, 2048),
     "expandable_segments:True"),
]


def events_from_device_trace(trace: list[dict]) -> list[tuple]:
    """The snapshot's device trace as replay events: alloc -> "a", free_completed -> "f" (keyed by address)."""
    out = []
    for e in trace:
        if e["action"] == "alloc":
            out.append(("a", e["addr"], e["size"], 0, "gpu", "", "", 0))
        elif e["action"] == "free_completed":
            out.append(("f", e["addr"], 0, 0, "gpu", "", "", 0))
    return out


def segment_sizes(segments) -> list[int]:
    return sorted(s["total_size"] if isinstance(s, dict) else s.total_size for s in segments)


def run_gpu(card, plan: Plan, lens: tuple[int, ...], conf: str) -> dict:
    """The real run: max reserved, the final segment sizes and the device trace's events."""
    import torch

    from peftplan.measure.step import build_model, make_batch, make_optimizer, train_step

    torch.cuda.memory._set_allocator_settings(conf or "expandable_segments:False")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(context=None, stacks="python", max_entries=2_000_000)
    model, _ = build_model(card, plan, "cuda")
    optimizer = make_optimizer(model, plan)
    batch = None
    for s in lens:
        batch = make_batch(card, plan.with_(seq_len=s), "cuda")
        train_step(model, batch, optimizer, plan)
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    out = {"max_reserved_bytes": torch.cuda.max_memory_reserved(), "max_allocated_bytes": torch.cuda.max_memory_allocated(),
           "segments": segment_sizes(snap["segments"]),
           "events": events_from_device_trace([e for dev in snap["device_traces"] for e in dev])}
    del model, optimizer, batch
    torch.cuda.empty_cache()
    return out


def point(name: str, plan: Plan, lens: tuple[int, ...], conf: str, dry_run: bool) -> dict:
    from peftplan.trace.run import trace

    card = load_card(name)
    config = AllocatorConfig.parse(conf)
    tr = trace(card, plan, seq_lens=lens, record_events=True)
    predicted = replay(tr.events, config, seq_lens=lens)
    if dry_run:  # no GPU: the trace's own stream stands in for the device trace, through the snapshot format
        fake_trace = [{"action": "alloc" if e[0] == "a" else "free_completed", "addr": e[1], "size": e[2]}
                      for e in tr.events]
        real = {"max_reserved_bytes": predicted.peak_reserved_bytes,
                "max_allocated_bytes": predicted.peak_allocated_bytes,
                "segments": segment_sizes(predicted.segments), "events": events_from_device_trace(fake_trace)}
    else:
        real = run_gpu(card, plan, lens, conf)
    of_real = replay(real["events"], config)
    model_segments = segment_sizes(of_real.segments)
    diff = Counter(real["segments"]) - Counter(model_segments) + (Counter(model_segments) - Counter(real["segments"]))
    return {
        "model": name, "plan": plan.to_dict(), "seq_lens": list(lens), "alloc_conf": conf,
        "gpu_max_reserved_bytes": real["max_reserved_bytes"], "gpu_max_allocated_bytes": real["max_allocated_bytes"],
        "replay_of_gpu_stream_reserved_bytes": of_real.peak_reserved_bytes,
        "replay_of_gpu_stream_allocated_bytes": of_real.peak_allocated_bytes,
        "replay_of_trace_reserved_bytes": predicted.peak_reserved_bytes,
        "trace_live_bytes": predicted.peak_live_bytes,
        "rules_error": of_real.peak_reserved_bytes / real["max_reserved_bytes"] - 1,
        "prediction_error": predicted.peak_reserved_bytes / real["max_reserved_bytes"] - 1,
        "flat_2pct_error": 1.02 * predicted.peak_live_bytes / real["max_reserved_bytes"] - 1,
        "segments_gpu": len(real["segments"]), "segments_mismatched": sum(diff.values()),
        "gpu_events": len(real["events"]),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--budget-s", type=float, default=150.0)
    ap.add_argument("--dry-run", action="store_true", help="CPU: no GPU, the pipeline end to end")
    ap.add_argument("--only", type=int, nargs="*", default=None, help="point indices to run")
    args = ap.parse_args(argv)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("gpu_reserved: no CUDA device (use --dry-run on the CPU)", file=sys.stderr)
            return 2
    t0 = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    rows, errors = [], []
    for i, (name, plan, lens, conf) in enumerate(POINTS):
        if args.only is not None and i not in args.only:
            continue
        if time.monotonic() - t0 > args.budget_s:
            errors.append(f"{i}: not run (budget)")
            continue
        try:
            r = point(name, plan, lens, conf, args.dry_run)
        except Exception as e:  # one point's failure never loses the others
            errors.append(f"{i} {name} {plan.method}: {type(e).__name__}: {str(e)[:200]}")
            print(f"[{i}] error {errors[-1]}", flush=True)
            continue
        rows.append(r)
        print(f"[{i}] {name} {plan.method} b{plan.batch_size} lens={lens} {conf or 'default'}: gpu "
              f"{r['gpu_max_reserved_bytes'] / MiB:,.0f} MiB reserved; replay of its stream "
              f"{100 * r['rules_error']:+.2f}% ({r['segments_mismatched']} segments differ); trace replay "
              f"{100 * r['prediction_error']:+.2f}%; flat 2% {100 * r['flat_2pct_error']:+.2f}%", flush=True)
        (args.out / "reserved.json").write_text(json.dumps({"dry_run": args.dry_run, "rows": rows,
                                                            "errors": errors}, indent=1))
    (args.out / "reserved.json").write_text(json.dumps({"dry_run": args.dry_run, "rows": rows, "errors": errors},
                                                       indent=1))
    return 0 if rows and not [e for e in errors if "budget" not in e] else 1


if __name__ == "__main__":
    sys.exit(main())
