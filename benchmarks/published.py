"""Benchmark: the estimate held to published GPU measurements (../shared/published/measurements.jsonl).

Each row that peftplan can express becomes a plan (`plan_for_row`); the figure compared is the one the row
measured: torch max allocated / peak active -> the estimate's tensor bytes, max reserved -> reserved bytes,
nvidia-smi -> device bytes. Rows from stacks with their own model code (LitGPT, torchtune) are reported apart
from transformers-based rows (HF Trainer + peft); rows that cannot be expressed are listed with the reason.

    python benchmarks/published.py [--jsonl PATH] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

from peftplan.errors import PlanError
from peftplan.plan import Plan

ROOT = Path(__file__).resolve().parent.parent
# shared/ lies beside the checkout (a worktree elsewhere falls back to the workplace's copy)
JSONL = next((p for p in (ROOT.parent / "shared" / "published" / "measurements.jsonl",
                          Path("/work/shared/published/measurements.jsonl")) if p.exists()),
             ROOT.parent / "shared" / "published" / "measurements.jsonl")
OUT = Path(__file__).resolve().parent / "results" / "published.json"

sys.path.insert(0, str(Path(__file__).resolve().parent))
from published_throughput import hub_cards  # noqa: E402  (Hub id -> card: the cards' sources + aliases)

OWN_MODEL_CODE = ("litgpt", "torchtune")  # sources whose model code and LoRA layers are not transformers/peft


def stack_of(row: dict) -> str:
    """"transformers" (HF Trainer + peft) or the stack with its own model code (litgpt, torchtune)."""
    rid = row["id"]
    return next((s for s in OWN_MODEL_CODE if rid.startswith(s)), "transformers")


def metric_of(row: dict) -> str | None:
    """Which estimate figure the row's measurement corresponds to: tensor, reserved or device; None: not a peak."""
    m = row["metric"].lower()
    if "capacity boundary" in m:
        return None
    if "nvidia-smi" in m or "nvml" in m:
        return "device"
    if "reserved" in m:
        return "reserved"
    if "allocated" in m or "active" in m or "torchtune peak memory" in m:
        return "tensor"
    return None


def _targets(row: dict) -> str | None:
    t = row["targets"].split(" (")[0].strip()
    if "all linear" in row["targets"] or t.replace(" ", "") == "q,k,v,o,gate,up,down":
        return "all-linear"
    if t.startswith("query,value"):  # LitGPT's fused QKV rows: q and v
        return "q_proj,v_proj"
    if "MLP" in row["targets"] or "+" in t:
        return None
    return t.replace(" ", "")


def transformers_version(row: dict) -> tuple[int, int] | None:
    """(major, minor) of the transformers release a row names in its notes; None when it names none."""
    m = re.search(r"transformers (\d+)\.(\d+)", row["notes"])
    return (int(m.group(1)), int(m.group(2))) if m else None


def shifts_logits(row: dict) -> bool:
    """transformers <= 4.48's causal-LM loss copies the shifted fp32 logits (planning/loss.py); a row of a
    transformers-based stack that names such a release ran it. Own-model-code stacks compute their own loss."""
    v = transformers_version(row)
    return stack_of(row) == "transformers" and v is not None and v < (4, 49)


def plan_for_row(row: dict) -> tuple[str, Plan] | str:
    """(card name, Plan) for a published row, or the reason it cannot be expressed.

    The row's text fields are read as the README of ../shared/published describes them: method, r, alpha,
    targets, batch_size, seq_len, dtype, mixed_precision, optimizer, grad_ckpt, attention.
    """
    card = hub_cards().get(row["model"])
    if card is None:
        return "cannot be expressed: no card for " + row["model"]
    if metric_of(row) is None:
        return "cannot be expressed: the metric is not a peak (" + row["metric"][:40] + ")"
    method = row["method"]
    if "torchao" in method:
        return "cannot be expressed: torchao NF4 base (not bitsandbytes)"
    if method not in ("full", "lora", "qlora"):
        return f"cannot be expressed: method '{method.split(' (')[0]}'"
    if not row.get("seq_len"):
        return "cannot be expressed: sequence length not stated"
    opt = row["optimizer"].lower().replace("not paged, not 8-bit", "")
    if any(w in opt for w in ("8bit", "8-bit", "deepspeed", "paged", "in_bwd", "fused=true")) or \
            "offload" in row["grad_ckpt"]:
        return "cannot be expressed: optimizer (" + row["optimizer"][:50] + ")"
    if "torchao" in method or "compile" in row["attention"]:
        return "cannot be expressed: torchao NF4 / torch.compile kernels"
    dtype_text, mp = row["dtype"].lower(), row["mixed_precision"].lower()
    kw: dict = dict(method=method, batch_size=int(row["batch_size"]), seq_len=int(row["seq_len"]))
    if method != "full":
        targets = _targets(row)
        if targets is None:
            return "cannot be expressed: LoRA targets " + row["targets"][:40]
        kw.update(r=int(row["r"]), alpha=float(row["alpha"] or 2 * row["r"]), targets=targets)
        drop = re.search(r"(?:lora_dropout|LoRA dropout) ([0-9.]+)", row["notes"])
        if drop:
            kw["dropout"] = float(drop.group(1).rstrip("."))
        # peft keeps adapters fp32 (autocast_adapter_dtype); LitGPT/torchtune/bf16-true stacks keep them bf16
        kw["adapter_dtype"] = "bf16" if ("lora bf16" in dtype_text or "bf16-true" in dtype_text
                                         or "incl. lora in bf16" in dtype_text
                                         or "base and lora" in dtype_text) else "fp32"
    if dtype_text.startswith("fp32") and "bf16" in mp:
        kw.update(dtype="fp32", autocast="bf16")
    elif dtype_text.startswith("fp32"):
        kw.update(dtype="fp32")
    elif "bf16 autocast" in mp or mp.startswith("bf16"):
        kw.update(autocast="bf16")  # over bf16 weights (pure bf16 + autocast) or a 4-bit base
    if method == "qlora":
        kw["double_quant"] = "nf4-dq" in dtype_text or "double" in dtype_text or "dq" in dtype_text
        kw["kbit_prep"] = "no upcast" not in dtype_text and "no fp32 upcast" not in dtype_text and \
            stack_of(row) == "transformers"
    gc = row["grad_ckpt"].lower()
    kw["grad_checkpointing"] = gc.startswith("on") or gc.startswith("presumably")
    kw["use_reentrant"] = "use_reentrant default true" in gc or "reentrant" in gc and stack_of(row) == "transformers"
    kw["logits_shift_copy"] = shifts_logits(row)
    att = row["attention"].lower()
    kw["attention"] = "flash" if "flash_attention_2" in att else ("eager" if att.startswith("eager") else "sdpa")
    try:
        return card, Plan(**kw)
    except PlanError as e:
        return f"cannot be expressed: {e}"


def compare_row(row: dict) -> dict:
    """Predicted vs measured for one row (MiB), or the reason it is left out."""
    from peftplan.planning import estimate

    got = plan_for_row(row)
    out = {"id": row["id"], "stack": stack_of(row), "measured_mib": row["value_mib"],
           "fixed_shape": row["seq_note"].lower().startswith("fixed")}  # else seq_len is an upper bound
    if isinstance(got, str):
        return out | {"reason": got}
    card, plan = got
    est = estimate(card, plan)
    metric = metric_of(row)
    peak = max(est.phases, key=lambda m: m.tensor_bytes)
    value = {"tensor": peak.tensor_bytes, "reserved": peak.reserved_bytes, "device": peak.device_bytes}[metric]
    predicted = value / 2**20
    return out | {"card": card, "metric": metric, "predicted_mib": round(predicted, 1), "phase": peak.phase,
                  "error": (predicted - row["value_mib"]) / row["value_mib"]}


def summary(rows: list[dict]) -> dict:
    by: dict[str, list[float]] = {}
    for r in rows:
        if "error" in r:
            by.setdefault(r["stack"], []).append(abs(r["error"]))
    return {k: {"n": len(v), "median_abs_error": statistics.median(v), "max_abs_error": max(v)}
            for k, v in by.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jsonl", type=Path, default=JSONL)
    ap.add_argument("--json", type=Path, default=OUT)
    ap.add_argument("--fit", action="store_true", help="throughput: refit the roofline's efficiency constants")
    args = ap.parse_args()
    rows = [compare_row(json.loads(line)) for line in args.jsonl.read_text().splitlines() if line.strip()]
    s = summary(rows)
    for stack in ("transformers", *OWN_MODEL_CODE):
        print(f"\n== {stack} rows")
        for r in rows:
            if r["stack"] == stack and "error" in r:
                print(f"  {r['id']:<48} {r['card']:<16} {r['metric']:<8} predicted {r['predicted_mib']:>9,.0f} MiB"
                      f"  measured {r['measured_mib']:>9,.0f} MiB  {100 * r['error']:+6.1f}%"
                      f"{'' if r['fixed_shape'] else '  (s is a padded maximum)'}")
        if stack in s:
            print(f"  median |error| {100 * s[stack]['median_abs_error']:.1f}%, max {100 * s[stack]['max_abs_error']:.1f}%"
                  f" over {s[stack]['n']} rows")
    print("\n== not expressed")
    for r in rows:
        if "reason" in r:
            print(f"  {r['id']:<48} {r['reason']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(".tmp")
    tmp.write_text(json.dumps({"summary": s, "rows": rows}, indent=1))
    tmp.replace(args.json)
    reserved()
    throughput(args.fit)


def reserved() -> None:
    """Device (nvidia-smi) peaks from measured allocated × the reserved relation: flat 2% vs the replay-fitted ρ
    (benchmarks/published_reserved.py)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import published_reserved as pr

    print("\n== reserved / device (nvidia-smi) rows: flat 2% vs the allocator replay's relation")
    pr.main([])


def throughput(refit: bool) -> None:
    """Predicted vs published tokens/s (benchmarks/published_throughput.py)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import published_throughput as pt

    rows = pt.load_rows()
    print("\n== throughput (tokens/s)")
    print(pt.throughput_table(rows))
    if refit:
        cases, _ = pt.throughput_cases(rows)
        print(pt.fit_efficiency(cases))


if __name__ == "__main__":
    main()
