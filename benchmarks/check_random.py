"""Benchmark: the estimate against the fake-tensor trace on randomly drawn configurations (issue 17).

Draws N (card, plan) pairs over every card family and every Plan option (`peftplan.trace.random_check`),
traces each, and prints median / p99 / max |error| of the peak, the worst configurations with the command that
reproduces each, and the errors grouped by method × checkpointing × peak phase. Writes
benchmarks/results/check_random.json.

    python benchmarks/check_random.py                  # 1,000 configurations, seed 17 (~15 min on 2 cores)
    python benchmarks/check_random.py --n 100 --seed 3
    python benchmarks/check_random.py --shard 0/3 & ... --shard 2/3; python benchmarks/check_random.py --merge 3
        # the same 1,000 draws in 3 processes (draw i goes to shard i mod 3), then one summary
    python benchmarks/check_random.py --recheck flan-t5
        # after a fix to one family: trace again the draws of the same seed whose card name contains flan-t5,
        # replace their rows in the results file, summarise all again
    python benchmarks/check_random.py --recheck-dora   # the same for the draws whose plan uses DoRA
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

from peftplan.trace.random_check import check, command, draws, indexed_draws

OUT = Path(__file__).resolve().parent / "results" / "check_random.json"


def quantile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(round(q * (len(sorted_values) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--shard", default="", help="K/N: trace only draws i with i mod N == K, into a shard file")
    ap.add_argument("--merge", type=int, default=0, help="N: summarise the N shard files of a sharded run")
    ap.add_argument("--recheck", default="", help="comma list of card-name substrings: re-trace those draws only")
    ap.add_argument("--recheck-dora", action="store_true", help="re-trace the draws whose plan uses DoRA")
    args = ap.parse_args()
    if args.merge:
        return merge(args)
    if args.recheck or args.recheck_dora:
        return recheck(args)
    t0 = time.perf_counter()

    done: list = []

    def progress(i, card, plan, c, reason):
        if c is not None:
            done.append(abs(c.peak_error))
        if (i + 1) % 25 == 0 and done:  # partial figures survive an interrupted run
            e = sorted(done)
            partial = {"n": len(e), "seed": args.seed, "median_abs_error": statistics.median(e),
                       "p99_abs_error": quantile(e, 0.99), "max_abs_error": e[-1],
                       "within_2pct": sum(x <= 0.02 for x in e), "partial": True}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.out.with_suffix(".tmp")
            tmp.write_text(json.dumps({"summary": partial}, indent=1))
            tmp.replace(args.out)
        if c is None:
            print(f"[{i + 1}/{args.n}] FAIL {command(card, plan)}: {reason}", flush=True)
        elif abs(c.peak_error) > 0.02:
            print(f"[{i + 1}/{args.n}] OUT {100 * c.peak_error:+.2f}% ({c.trace_phase}) {command(card, plan)}",
                  flush=True)
        elif (i + 1) % 50 == 0:
            print(f"[{i + 1}/{args.n}] {time.perf_counter() - t0:.0f} s", flush=True)

    configs = draws(args.n, args.seed)
    if args.shard:
        k, n_shards = (int(x) for x in args.shard.split("/"))
        configs = configs[k::n_shards]
        args.out = shard_path(args.out, k)
    results, failures = check(configs, progress)
    seconds = time.perf_counter() - t0
    rows = sorted(_rows(results), key=lambda r: -abs(r["peak_error"]))
    report(rows, failures, args.seed, seconds, args.out)


def _rows(results) -> list[dict]:
    return [{"command": command(card, c.plan), "peak_error": c.peak_error, "trace_phase": c.trace_phase,
             "estimate_phase": c.estimate_phase, "trace_peak_bytes": c.trace_peak_bytes,
             "estimate_peak_bytes": c.estimate_peak_bytes, "trace_seconds": round(c.trace_seconds, 2),
             "method": c.plan.method, "grad_checkpointing": c.plan.grad_checkpointing} for card, c in results]


def _card_of(row: dict) -> str:
    words = row["command"].split()
    return words[words.index("--model") + 1]


def recheck(args) -> None:
    """Re-trace the draws (same n, seed) whose card name contains one of `args.recheck` (or, --recheck-dora,
    whose plan uses DoRA), replacing their rows."""
    names = [x for x in args.recheck.split(",") if x]
    dora = args.recheck_dora
    data = json.loads(args.out.read_text())
    if data["summary"].get("partial") or data["summary"]["seed"] != args.seed:
        raise SystemExit(f"{args.out} is not a finished run of seed {args.seed}")
    t0 = time.perf_counter()
    old_n = data["summary"]["n"] + data["summary"]["failed"]  # that run's draws: indices 0 .. old_n - 1
    configs = [(card, plan) for i, card, plan in indexed_draws(args.n, args.seed)
               if any(x in card.name for x in names) or (dora and plan.use_dora)
               or i >= old_n]  # and any drawn in place of a skipped one
    results, failures = check(configs)
    kept = [r for r in data["results"] if not (any(x in _card_of(r) for x in names)
                                               or (dora and " --dora" in r["command"]))]
    failures += [f for f in data["failures"] if not (any(x in f.split(":")[0] for x in names)
                                                     or (dora and " --dora" in f.split(":")[0]))]
    what = ", ".join(names + (["DoRA plans"] if dora else []))
    print(f"re-traced {len(configs)} draws of {what} in {time.perf_counter() - t0:.0f} s")
    report(sorted(kept + _rows(results), key=lambda r: -abs(r["peak_error"])), failures, args.seed,
           data["summary"]["seconds"], args.out)


def shard_path(out: Path, k: int) -> Path:
    return out.with_name(f"{out.stem}.shard{k}.json")


def merge(args) -> None:
    """One summary (and results file) from the shard files of a sharded run."""
    rows, failures, seconds = [], [], 0.0
    for k in range(args.merge):
        data = json.loads(shard_path(args.out, k).read_text())
        if data["summary"].get("partial"):
            raise SystemExit(f"shard {k} is unfinished")
        rows += data["results"]
        failures += data["failures"]
        seconds = max(seconds, data["summary"]["seconds"])
    report(sorted(rows, key=lambda r: -abs(r["peak_error"])), failures, args.seed, seconds, args.out)


def report(rows: list[dict], failures: list[str], seed: int, seconds: float, out: Path) -> None:
    errs = sorted(abs(r["peak_error"]) for r in rows)
    kinds = defaultdict(list)
    for r in rows:
        kinds[(r["method"], r["grad_checkpointing"], r["trace_phase"])].append(abs(r["peak_error"]))
    summary = {"n": len(errs), "seed": seed, "failed": len(failures), "seconds": round(seconds, 1),
               "median_abs_error": statistics.median(errs), "p99_abs_error": quantile(errs, 0.99),
               "max_abs_error": errs[-1], "within_2pct": sum(e <= 0.02 for e in errs),
               "trace_seconds_median": statistics.median(r["trace_seconds"] for r in rows)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"summary": summary, "failures": failures, "results": rows}, indent=1))
    tmp.replace(out)
    print(f"\n{summary['n']} configurations (seed {seed}) in {seconds:.0f} s "
          f"({summary['trace_seconds_median']:.2f} s median trace): median |error| "
          f"{100 * summary['median_abs_error']:.2f}%, p99 {100 * summary['p99_abs_error']:.2f}%, "
          f"max {100 * summary['max_abs_error']:.2f}%; {summary['within_2pct']} within 2%; {len(failures)} failed")
    print("\nby method × checkpointing × traced peak phase: n, median, max |error|")
    for (m, gc, ph), v in sorted(kinds.items()):
        print(f"  {m:8s} gc={'on ' if gc else 'off'} {ph:9s} {len(v):4d} {100 * statistics.median(v):5.2f}% "
              f"{100 * max(v):5.2f}%")
    print("\nworst 10:")
    for r in rows[:10]:
        print(f"  {100 * r['peak_error']:+6.2f}% {r['trace_phase']:9s} {r['command']}")
    for f in failures:
        print("FAILED", f)


if __name__ == "__main__":
    main()
