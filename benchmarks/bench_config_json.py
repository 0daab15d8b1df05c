"""Benchmark: `peftplan estimate -m CONFIG.json`, first call (builds on meta, writes the card) and cached call.

Targets (issue 11): first estimate of a new config.json ≤ 5 s; a cached call as fast as a shipped card
(≤ 0.3 s cold, torch not imported: tests/test_cardgen.py asserts the import). Baselines in the same process:
`python -c pass` and the cold estimate of a shipped card (qwen3-8b).
Each first call gets a fresh PEFTPLAN_CACHE, so it really builds; configs from tests/data/configs.
"""
from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("qwen3-8b", "mixtral-8x7b", "llama-3.3-70b", "gemma-3-27b", "flan-t5-large")


CPU: list[float] = []  # user + system CPU seconds of the last child (the machine's load does not inflate it)


def timed(cmd: list[str], env: dict) -> float:
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
    return wall


def cpu_median(n: int) -> float:
    return statistics.median(CPU[-n:])


def main() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    est = [sys.executable, "-m", "peftplan", "estimate", "--targets", "all-linear", "-m"]
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; wall (CPU) seconds")
    base = statistics.median(timed([sys.executable, "-c", "pass"], env) for _ in range(5))
    base_cpu = cpu_median(5)
    shipped = statistics.median(timed(est + ["qwen3-8b"], env) for _ in range(5))
    shipped_cpu = cpu_median(5)
    print(f"python -c pass (baseline)            median {base:.3f} s ({base_cpu:.3f} s CPU)")
    print(f"estimate qwen3-8b (shipped card)     median {shipped:.3f} s ({shipped_cpu:.3f} s CPU)")
    firsts, cached = [], []
    for name in CONFIGS:
        with tempfile.TemporaryDirectory() as cache:
            e = dict(env, PEFTPLAN_CACHE=cache)
            path = str(ROOT / "tests/data/configs" / name / "config.json")
            first = timed(est + [path], e)
            first_cpu = CPU[-1]
            again = statistics.median(timed(est + [path], e) for _ in range(5))
            again_cpu = cpu_median(5)
        firsts.append(first)
        cached.append(again)
        print(f"{name:16s} first {first:6.2f} s ({first_cpu:.2f} s CPU; target ≤ 5 s)   cached median {again:.3f} s "
              f"({again_cpu:.3f} s CPU; target ≤ 0.3 s; {again / shipped:.2f}× the shipped card)")
    print(f"first call: median {statistics.median(firsts):.2f} s, max {max(firsts):.2f} s;  "
          f"cached: median {statistics.median(cached):.3f} s, max {max(cached):.3f} s")


if __name__ == "__main__":
    main()
