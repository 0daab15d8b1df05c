"""Benchmark: `peftplan estimate -m CONFIG.json`, first call (builds on meta, writes the card) and cached call.

Targets (issue 11): first estimate of a new config.json ≤ 5 s; a cached call as fast as a shipped card
(≤ 0.3 s cold, torch not imported: tests/test_cardgen.py asserts the import). Baselines in the same process:
`python -c pass`, the cold estimate of a shipped card (qwen3-8b), and the first call built in-process
(PEFTPLAN_CARD_WORKER=0: no forked worker, no deferred imports; peftplan/cardgen_worker.py).
Each first call gets a fresh PEFTPLAN_CACHE, so it really builds; configs from tests/data/configs. CPU seconds
(user + system of the child and its worker) are printed beside wall seconds: a loaded machine inflates wall time.
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
    firsts, firsts_cpu, inproc, inproc_cpu, cached = [], [], [], [], []
    for name in CONFIGS:
        path = str(ROOT / "tests/data/configs" / name / "config.json")
        with tempfile.TemporaryDirectory() as cache:
            baseline = timed(est + [path], dict(env, PEFTPLAN_CACHE=cache, PEFTPLAN_CARD_WORKER="0"))
            inproc.append(baseline)
            inproc_cpu.append(CPU[-1])
        with tempfile.TemporaryDirectory() as cache:
            e = dict(env, PEFTPLAN_CACHE=cache)
            first = timed(est + [path], e)
            firsts.append(first)
            firsts_cpu.append(CPU[-1])
            again = statistics.median(timed(est + [path], e) for _ in range(5))
            again_cpu = cpu_median(5)
        cached.append(again)
        print(f"{name:16s} first {first:5.2f} s ({firsts_cpu[-1]:.2f} s CPU; target ≤ 5 s; in-process "
              f"{baseline:.2f} s, {inproc_cpu[-1]:.2f} s CPU)   cached median {again:.3f} s ({again_cpu:.3f} s CPU; "
              f"target ≤ 0.3 s; {again / shipped:.2f}× the shipped card)")
    print(f"first call: median {statistics.median(firsts):.2f} s, max {max(firsts):.2f} s; CPU median "
          f"{statistics.median(firsts_cpu):.2f} s, max {max(firsts_cpu):.2f} s ({statistics.median(firsts_cpu) / statistics.median(inproc_cpu):.2f}× the "
          f"in-process build's {statistics.median(inproc_cpu):.2f} s CPU)")
    print(f"cached: median {statistics.median(cached):.3f} s, max {max(cached):.3f} s")


if __name__ == "__main__":
    main()
