"""Benchmark: time and resident memory of tracing one full-size training step on fake tensors.

Target (issue 4): one step of a 7B model ≤ 10 s and ≤ 1.5 GiB resident on the 2-core development machine;
70B must work too. Each configuration runs in a fresh process (so resident memory is its own), after a burn-in
trace of a one-block copy of the model; times are the trace's own wall time (model build on fake tensors + steps).

    python benchmarks/bench_trace.py
"""
from __future__ import annotations

import json
import subprocess
import sys

CONFIGS = [
    ("opt-6.7b", "lora", 4, 512),
    ("llama-2-7b", "qlora", 4, 512),
    ("llama-3.1-8b", "full", 1, 512),
    ("llama-2-70b", "lora", 1, 512),
]

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from peftplan.planning.cards import load_card
from peftplan.plan import Plan
from peftplan.trace.run import trace
t_import = time.perf_counter() - t0
name, method, b, s = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
card = load_card(name)
import dataclasses
# burn-in: first-use costs (bitsandbytes' kernels registry, fake-mode caches) on a 1-block model, not timed
trace(dataclasses.replace(card, n_layers=1), Plan(method=method, batch_size=1, seq_len=16), steps=1)
one = trace(card, Plan(method=method, batch_size=b, seq_len=s), steps=1)
two = trace(card, Plan(method=method, batch_size=b, seq_len=s), steps=2)
print(json.dumps({"import_s": t_import, "one_step_s": one.seconds, "two_steps_s": two.seconds,
                  "peak_gib": two.peak_bytes / 2**30, "ops": two.ops,
                  "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def main() -> None:
    print(f"{'model':<14}{'method':<8}{'b×s':>9}{'1 step':>9}{'2 steps':>9}{'RSS':>10}{'traced peak':>13}")
    for name, method, b, s in CONFIGS:
        out = subprocess.run([sys.executable, "-c", CHILD, name, method, str(b), str(s)], capture_output=True,
                             text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{name:<14}{method:<8}{f'{b}×{s}':>9}{r['one_step_s']:>8.1f}s{r['two_steps_s']:>8.1f}s"
              f"{r['max_rss_gib']:>8.2f}GiB{r['peak_gib']:>10.2f}GiB")
    print("targets: one step of a 7B ≤ 10 s, ≤ 1.5 GiB resident")


if __name__ == "__main__":
    main()
