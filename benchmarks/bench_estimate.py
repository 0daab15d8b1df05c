"""Benchmark: `peftplan estimate` as a cold process, and the Python API's configurations per second.

Targets (issue 2): cold CLI median ≤ 0.3 s on the 2-core development machine; API ≥ 20,000 configurations/s.
Baseline in the same process: a bare `python -c pass` start, to show what the interpreter alone costs.
"""
from __future__ import annotations

import itertools
import statistics
import subprocess
import sys
import time


def cold(cmd: list[str], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        out.append(time.perf_counter() - t0)
    return out


def api_rate(seconds: float = 2.0) -> tuple[float, int]:
    from peftplan import Plan, estimate
    from peftplan.planning.cards import registry

    cards = [registry()[n] for n in ("opt-6.7b", "llama-3.1-8b", "mistral-7b-v0.1", "qwen2.5-7b", "gemma-2-9b")]
    grid = [Plan(method=m, r=r, batch_size=b, seq_len=s, grad_checkpointing=gc)
            for m, r, b, s, gc in itertools.product(("full", "adapter", "lora", "qlora"), (8, 16, 64), (1, 2, 4, 8),
                                                    (256, 512, 1024, 2048), (False, True))]
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for card in cards:
            for plan in grid:
                estimate(card, plan, gpu="a100-80gb", tokens=10**8)
                n += 1
    return n / (time.perf_counter() - t0), len(cards) * len(grid)


def main() -> None:
    runs = 7
    base = cold([sys.executable, "-c", "pass"], runs)
    cli = cold([sys.executable, "-m", "peftplan", "estimate", "--model", "opt-6.7b", "--method", "qlora", "--r", "16"],
               runs)
    rate, distinct = api_rate()
    print(f"python -c pass (baseline)      median {statistics.median(base):.3f} s")
    print(f"peftplan estimate (cold CLI)   median {statistics.median(cli):.3f} s  "
          f"(min {min(cli):.3f}, max {max(cli):.3f}; {statistics.median(cli) / statistics.median(base):.1f}× baseline)"
          f"  target ≤ 0.300 s")
    print(f"estimate() API                 {rate:,.0f} configurations/s over {distinct} distinct plans  "
          f"target ≥ 20,000/s")


if __name__ == "__main__":
    main()
