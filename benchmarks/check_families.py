"""Benchmark: the estimate against the fake-tensor trace on the generated cards' families (issue 11, part 3).

Runs every entry of `peftplan.trace.family_grid.CONFIGS` (a list of (card, options); MoE entries are added to
the same list), prints each peak error, the summary (median, p90, max |error|, how many within 2%) and the
errors grouped by family, and writes benchmarks/results/check_families.json. A configuration that cannot be
traced is a FAIL row (one line) and the others go on.

    python benchmarks/check_families.py             # every configuration (~135, a few minutes on 2 cores)
    python benchmarks/check_families.py --only qwen3,falcon
    python benchmarks/check_families.py --random 40 --seed 11   # off the grid: every Plan option drawn
                                                                 # (peftplan.trace.random_check) on 1–3 blocks
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from pathlib import Path

from peftplan.errors import PlanError
from peftplan.trace.check import one_line, run_grid, save_grid, summarize
from peftplan.trace.family_grid import CONFIGS, resolve


def random_draws(n: int, seed: int) -> None:
    """n (card, plan) drawn over the grid's cards (cut to 1–3 blocks) and every Plan option, worst first."""
    import random

    from peftplan.planning.cards import registry
    from peftplan.trace.random_check import check, command, cut, draw_plan

    names = sorted({c.card for c in CONFIGS})
    rng = random.Random(seed)
    configs = []
    for _ in range(n):
        card = cut(registry()[rng.choice(names)], rng.randint(1, 3))
        configs.append((card, draw_plan(rng, card)))
    results, failures = check(configs)
    for card, c in sorted(results, key=lambda rc: -abs(rc[1].peak_error)):
        print(f"{100 * c.peak_error:+7.2f}% {c.trace_phase:9s} {command(card, c.plan)}")
    for f in failures:
        print(f"FAIL {one_line(f, 300)}")
    within = sum(abs(c.peak_error) <= 0.02 for _, c in results)
    print(f"{len(results)} random configurations (seed {seed}): {within} within 2%; {len(failures)} failed")

OUT = Path(__file__).resolve().parent / "results" / "check_families.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="", help="comma list of substrings of card names")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--random", type=int, default=0, help="instead of the grid: N random draws")
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args()
    if args.random:
        return random_draws(args.random, args.seed)
    only = [x for x in args.only.split(",") if x]
    configs = [c for c in CONFIGS if not only or any(o in c.card for o in only)]
    t0 = time.perf_counter()
    labelled, unresolved = [], []
    for config in configs:
        try:
            labelled.append((config.label(), *resolve(config)))
        except PlanError as e:
            unresolved.append(f"{config.label()}: {one_line(e)}")
            print(f"FAIL {config.label()}: {one_line(e)}", flush=True)
    run = run_grid(labelled, extra=lambda card, c: {"family": card.family})
    results, failures, rows = run.results, unresolved + run.failures, run.rows
    by_family: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        by_family[row["family"]].append(abs(row["peak_error"]))
    s = summarize(results, failures)
    families = {f: {"n": len(v), "median_abs_error": statistics.median(v), "max_abs_error": max(v)}
                for f, v in sorted(by_family.items())}
    print(save_grid(args.out, s, rows, time.perf_counter() - t0, families=families))
    for f, v in families.items():
        print(f"  {f:12s} {v['n']:3d} configurations, median {100 * v['median_abs_error']:.2f}%, "
              f"max {100 * v['max_abs_error']:.2f}%")
    for r in sorted(rows, key=lambda r: -abs(r["peak_error"]))[:8]:
        print(f"  {100 * r['peak_error']:+.2f}%  {r['config']}")


if __name__ == "__main__":
    main()
