"""`advise` speed: the acceptance search (llama-3.1-8b QLoRA, 24 GB card, 64 × 2048) in-process and as a cold
process, against one `estimate` in the same process. Target: advise ≤ 1 s."""
from __future__ import annotations

import statistics
import subprocess
import sys
import time


def main() -> None:
    from peftplan.plan import Plan
    from peftplan.planning import estimate
    from peftplan.planning.advise import advise

    base = Plan(method="qlora", seq_len=2048, autocast="bf16")
    advise("llama-3.1-8b", base, "rtx4090", 64)  # warm the caches of card loading
    runs = []
    for _ in range(7):
        t = time.perf_counter()
        adv = advise("llama-3.1-8b", base, "rtx4090", 64)
        runs.append(time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(200):
        estimate("llama-3.1-8b", base.with_(batch_size=3))
    one = (time.perf_counter() - t) / 200
    cold = []
    for _ in range(5):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "peftplan", "advise", "-m", "llama-3.1-8b", "--method", "qlora",
                        "--gpu", "rtx4090", "--global-batch", "64", "--json"], check=True, capture_output=True)
        cold.append(time.perf_counter() - t)
    print(f"advise in-process: {statistics.median(runs) * 1e3:.1f} ms (median of 7), "
          f"{len(adv.candidates)} candidates; one estimate: {one * 1e3:.3f} ms "
          f"(advise = {statistics.median(runs) / one:.0f} estimates)")
    print(f"advise as a cold process: {statistics.median(cold):.2f} s (median of 5); target ≤ 1 s")


if __name__ == "__main__":
    main()
