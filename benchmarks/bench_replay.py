"""Benchmark: replaying a 7B training step's allocation events through the caching-allocator model.

Target (issue 20): ≤ 2 s per replay of a 7B step's events. Prints, per configuration, the events, the replay
time (default options and expandable segments, best of 3) and its ratio to the fake-tensor trace that made the
events (the baseline, timed in the same process).

    python benchmarks/bench_replay.py
"""
from __future__ import annotations

import time

from peftplan.plan import Plan
from peftplan.planning.allocator import AllocatorConfig
from peftplan.planning.cards import load_card
from peftplan.planning.replay import replay
from peftplan.trace.run import trace

CONFIGS = [("llama-2-7b", Plan(method="full", batch_size=4, seq_len=512)),
           ("llama-2-7b", Plan(method="lora", batch_size=4, seq_len=512, grad_checkpointing=True)),
           ("mistral-7b-v0.1", Plan(method="qlora", batch_size=4, seq_len=4096, grad_checkpointing=True))]
TARGET_S = 2.0


def main() -> None:
    worst = 0.0
    for name, plan in CONFIGS:
        t0 = time.perf_counter()
        tr = trace(load_card(name), plan, record_events=True)
        trace_s = time.perf_counter() - t0
        for label, conf in (("default", AllocatorConfig()), ("expandable", AllocatorConfig(expandable_segments=True))):
            times = []
            for _ in range(3):
                t = time.perf_counter()
                rp = replay(tr.events, conf)
                times.append(time.perf_counter() - t)
            best = min(times)
            worst = max(worst, best)
            print(f"{name} {plan.method} b{plan.batch_size} s{plan.seq_len} gc={plan.grad_checkpointing} {label}: "
                  f"{len(tr.events):,} events ({rp.allocations:,} allocations, 2 steps) replayed in {best:.3f} s "
                  f"= {best / trace_s:.3f}× the trace ({trace_s:.1f} s); max reserved {rp.peak_reserved_bytes / 2**30:.2f} GiB "
                  f"vs live {rp.peak_live_bytes / 2**30:.2f} GiB", flush=True)
    print(f"slowest replay {worst:.3f} s (target ≤ {TARGET_S} s): {'ok' if worst <= TARGET_S else 'OVER'}")


if __name__ == "__main__":
    main()
