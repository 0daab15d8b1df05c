"""Wall time of `peftplan report` for 5 models × 8 GPUs × 4 methods, fit searches included (target ≤ 3 s).

    python benchmarks/bench_report.py [--repeats 3]

Each timing runs in a fresh process, so the estimate's caches start cold as they do for `peftplan report`:
the report (compute and render, without writing the file) and the fit search alone.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

MODELS = ["opt-6.7b", "llama-3.1-8b", "mistral-7b-v0.1", "qwen2.5-7b", "llama-2-13b"]
GPUS = ["t4", "l4", "a10g", "rtx4090", "a100-40gb", "a100-80gb", "h100-sxm", "h200"]
METHODS = ["full", "adapter", "lora", "qlora"]
TARGET_S = 3.0


def one_run(what: str) -> dict:
    """Timed in this process (a child, so every cache starts cold); imports are not counted."""
    import plotly.offline  # noqa: F401
    from peftplan.planning.fit import fit_matrix
    from peftplan.report import build_report

    t0 = time.perf_counter()
    if what == "fit":
        fm = fit_matrix(MODELS, GPUS, METHODS, seq_len=512)
        return {"s": time.perf_counter() - t0, "cells": len(fm.cells)}
    page = build_report(MODELS, GPUS, methods=METHODS, seq_len=512, tokens=10**8, measured_dir=None)
    return {"s": time.perf_counter() - t0, "bytes": len(page)}


def child(what: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", what], capture_output=True, text=True)
    if out.returncode:
        sys.exit(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"child failed ({out.returncode})")
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=("fit", "report"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_run(args.child)))
        return
    fits = [child("fit") for _ in range(args.repeats)]
    reports = [child("report") for _ in range(args.repeats)]
    fit_s = statistics.median(r["s"] for r in fits)
    report_s = statistics.median(r["s"] for r in reports)
    print(f"{len(MODELS)} models × {len(GPUS)} GPUs × {len(METHODS)} methods = {fits[0]['cells']} fit cells, "
          f"page {reports[0]['bytes'] / 2**20:.1f} MiB; median of {args.repeats} cold processes each:")
    print(f"  fit search alone (largest batch + longest sequence per cell): {fit_s:.3f} s")
    print(f"  whole report (fit searches, every figure, HTML with plotly.js):  {report_s:.3f} s "
          f"(target ≤ {TARGET_S:g} s: {'met' if report_s <= TARGET_S else 'MISSED'})")


if __name__ == "__main__":
    main()
