"""Benchmark: the reserved-memory relation against published runs that report both allocated and reserved-side
figures (issue 20): the reserved section of `benchmarks/published.py`, which runs `reserved_section()` after the
memory rows.

Rows: ../shared/published/measurements.jsonl beside the checkout (or --data), every row whose metric is torch's max allocated and
whose notes also give the same run's nvidia-smi peak ("nvidia-smi peak memory.used minus initial = N MiB"):
fms-acceleration's A100-80GB benchmark (HF Trainer, packed fixed-length sequences). nvidia-smi sees what the
caching allocator reserved plus the CUDA context (and cuBLAS workspaces), so the prediction compared with it is
    device = ρ × allocated_measured + CUDA context + cuBLAS workspace      (peftplan/planning/memory.py)
with the measured allocated figure, so that only the reserved/allocated relation ρ is under test:
    flat      ρ = 1.02 (the estimate's former FRAGMENTATION = 0.02)
    fitted    ρ = RESERVED_PER_LIVE[peak phase], fitted from allocator replays over the check grid
    replayed  ρ = reserved / live of the replay of our own trace of that configuration (reserved_fit.jsonl),
              where the grid has it
Prints each row's error, and the mean |error| per predictor.

    python benchmarks/published_reserved.py [--data PATH]
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peftplan.planning.memory import CUBLAS_WORKSPACE_BYTES, CUDA_CONTEXT_BYTES, RESERVED_PER_LIVE  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from published_throughput import hub_cards  # noqa: E402

_ROOT = Path(__file__).resolve().parents[1]
DATA = next((p for p in (_ROOT.parent / "shared" / "published" / "measurements.jsonl",
                         Path("/work/shared/published/measurements.jsonl")) if p.exists()),
            _ROOT.parent / "shared" / "published" / "measurements.jsonl")
FIT = Path(__file__).resolve().parent / "results" / "reserved_fit.jsonl"
MiB = 2**20
SMI = re.compile(r"nvidia-smi peak memory\.used minus initial = ([\d,.]+) MiB")
# Hub id -> our card, for the replayed ρ (configurations the fit grid traced: b=4, s=4096, checkpointing)


@dataclass(frozen=True)
class ReservedRow:
    id: str
    model: str
    method: str
    batch_size: int
    seq_len: int
    grad_ckpt: bool
    allocated_mib: float  # torch.cuda.max_memory_allocated
    smi_mib: float  # nvidia-smi peak memory.used minus initial, same run


def reserved_rows(path: Path = DATA) -> list[ReservedRow]:
    """Published rows with both a max-allocated figure and the same run's nvidia-smi peak."""
    out = []
    for line in path.read_text().splitlines():
        d = json.loads(line)
        m = SMI.search(d.get("notes", ""))
        if not m or "max_memory_allocated" not in d["metric"]:
            continue
        out.append(ReservedRow(d["id"], d["model"], d["method"], int(d["batch_size"]), int(d["seq_len"]),
                               d["grad_ckpt"].startswith("on"), float(d["value_mib"]),
                               float(m.group(1).replace(",", ""))))
    return out


def peak_phase(method: str) -> str:
    """Where the live peak of these runs sits: full fine-tuning in the optimizer step (fms notes: same peak at
    batch 4 and 8), adapters with checkpointing at the start of backward (the fp32 logits' gradient)."""
    return "optimizer" if method == "full" else "backward"


def replayed_rho(row: ReservedRow, fit_path: Path = FIT) -> float | None:
    card = hub_cards().get(row.model)
    if card is None or not fit_path.exists():
        return None
    for line in fit_path.read_text().splitlines():
        r = json.loads(line)
        if (r["model"], r["method"], r["b"], r["s"], r["gc"]) == (card, row.method, row.batch_size, row.seq_len,
                                                                   row.grad_ckpt):
            return r["default"]["peak_reserved_bytes"] / r["default"]["peak_live_bytes"]
    return None


def evaluate_reserved(rows: list[ReservedRow]) -> dict:
    """Per row and predictor: predicted device MiB and relative error vs nvidia-smi; mean |error| per predictor."""
    fixed = (CUDA_CONTEXT_BYTES + CUBLAS_WORKSPACE_BYTES) / MiB
    per_row, errors = [], {"flat": [], "fitted": [], "replayed": []}
    for r in rows:
        rhos = {"flat": 1.02, "fitted": RESERVED_PER_LIVE[peak_phase(r.method)], "replayed": replayed_rho(r)}
        entry = {"id": r.id, "allocated_mib": r.allocated_mib, "smi_mib": r.smi_mib,
                 "measured_ratio": r.smi_mib / r.allocated_mib}
        for name, rho in rhos.items():
            if rho is None:
                continue
            pred = rho * r.allocated_mib + fixed
            entry[name] = {"rho": round(rho, 4), "predicted_mib": round(pred, 1), "error": pred / r.smi_mib - 1}
            errors[name].append(pred / r.smi_mib - 1)
        per_row.append(entry)
    summary = {k: {"n": len(v), "mean_abs_error": statistics.fmean(abs(e) for e in v) if v else None,
                   "max_abs_error": max((abs(e) for e in v), default=None)} for k, v in errors.items()}
    # the flat 2% on the same subset as the replayed rows, for a like-with-like figure
    sub = [e for e in per_row if "replayed" in e]
    if sub:
        summary["flat_on_replayed_rows"] = {"n": len(sub),
                                            "mean_abs_error": statistics.fmean(abs(e["flat"]["error"]) for e in sub)}
    return {"rows": per_row, "summary": summary}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=DATA)
    args = ap.parse_args(argv)
    res = evaluate_reserved(reserved_rows(args.data))
    for e in res["rows"]:
        preds = "  ".join(f"{k} ρ={e[k]['rho']:.3f} {100 * e[k]['error']:+6.1f}%" for k in ("flat", "fitted", "replayed")
                          if k in e)
        print(f"{e['id']:38s} allocated {e['allocated_mib']:8,.0f} MiB  nvidia-smi {e['smi_mib']:8,.0f} MiB "
              f"(×{e['measured_ratio']:.3f})  {preds}")
    for k, s in res["summary"].items():
        if s.get("n"):
            extra = f", max {100 * s['max_abs_error']:.1f}%" if s.get("max_abs_error") is not None else ""
            print(f"{k}: n={s['n']} mean |error| {100 * s['mean_abs_error']:.1f}%{extra}")


if __name__ == "__main__":
    main()
