"""The throughput section of `benchmarks/published.py` (which runs it after the memory section).

Throughput (issue 18): every row that publishes a throughput and that peftplan can express → predicted vs
published tokens/s, median and max |error| per source; the rows it cannot express, each with the reason. The
roofline's efficiency constants (peftplan/planning/timing.py, EFFICIENCY) are fitted to `timing.FIT_ROWS` only;
the other expressible rows check them.

    python benchmarks/published.py            # the throughput table
    python benchmarks/published.py --fit      # refit the constants on FIT_ROWS and print them

Row → plan mapping (what each source's stack does that peftplan's Plan does not say):
- fms-acceleration rows: HF Trainer of transformers 4.48, gradient_checkpointing with its default
  use_reentrant=True (Stack.reentrant); TRL's ConstantLengthDataset packs without resetting positions, so
  attention is causal over the whole 4,096 tokens; flash_attention_2 does the products of a fused causal kernel
  (peftplan's "sdpa"). The standard-peft LoRA row keeps peft's fp32 adapter weights with no autocast
  (Stack.adapter_dtype="fp32"); the QLoRA rows run under bf16 autocast. The FLOPs do not depend on these; the
  memory-bound glue does.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from peftplan.plan import Plan  # noqa: E402
from peftplan.planning import timing  # noqa: E402
from peftplan.planning.cards import load_card  # noqa: E402
from peftplan.planning.gpus import load_gpu, peak_tflops  # noqa: E402

PUBLISHED = ROOT.parent / "shared" / "published" / "measurements.jsonl"
if not PUBLISHED.exists():  # worktrees live one level deeper than the main checkout
    PUBLISHED = Path("/work/shared/published/measurements.jsonl")

# Hub model → shipped card: every card cites the config.json it was made from (its `source` URL); these aliases
# name checkpoints of the same architecture as a card's (mirrors, instruct vs base).
HUB_ALIASES = {
    "NousResearch/Llama-2-70b-hf": "llama-2-70b",
    "meta-llama/Llama-3.1-8B-Instruct": "llama-3.1-8b",
}


def hub_cards() -> dict[str, str]:
    """Hub id → card name: the shipped cards' own source URLs (planning/cards.py) plus HUB_ALIASES."""
    from peftplan.planning.cards import hub_cards as shipped

    return {**shipped(), **HUB_ALIASES}


def load_rows(path: Path = PUBLISHED) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def source_of(row: dict) -> str:
    """The publishing source, from the row id: fms, litgpt, torchtune, qwen, peft, unsloth, llamafactory."""
    return row["id"].split("_", 1)[0]


def card_for(row: dict) -> str | None:
    return hub_cards().get(row["model"])


def gpu_for(row: dict) -> str | None:
    g = row["gpu"].lower()
    if "4090" in g:
        return "rtx4090"
    if "a100" in g:
        return "a100-40gb" if "40gb" in g.replace(" ", "") else "a100-80gb"
    return None


# ---------------------------------------------------------------- published throughput


def published_tokens_per_s(row: dict) -> float | None:
    """Training tokens/s the row's source publishes (in its notes), or None.

    fms: HF Trainer's train_tokens_per_second. torchtune: "tokens/s N". Qwen: seconds per optimizer step
    ("s/it") per sequence length 256/512/1024/2048/4096/8192 at batch 1 × gradient accumulation 8, so
    tokens/s = 8·L / (s/it).
    """
    notes = row.get("notes", "")
    m = re.search(r"train_tokens_per_second (\d+(?:\.\d+)?)", notes)
    if m:
        return float(m.group(1))
    m = re.search(r"tokens/s ([\d,]+(?:\.\d+)?)", notes)
    if m:
        return float(m.group(1).replace(",", ""))
    m = re.search(r"\(([\d/]+)\):.*?s/it ([\d./]+?)\.?$", notes)
    if m:
        lengths = [int(x) for x in m.group(1).split("/")]
        secs = [float(x) for x in m.group(2).rstrip(".").split("/")]
        accum = re.search(r"gradient accumulation (\d+)", notes)
        if row["seq_len"] in lengths and accum:
            return int(accum.group(1)) * row["seq_len"] / secs[lengths.index(row["seq_len"])]
    return None


# ---------------------------------------------------------------- row → (card, plan, stack, gpu)


@dataclass(frozen=True)
class ThroughputCase:
    row_id: str
    source: str
    card: str
    gpu: str
    plan: Plan
    stack: timing.Stack
    published_tokens_per_s: float


def throughput_case(row: dict) -> ThroughputCase | str:
    """The plan and stack that reproduce a published throughput row, or the reason peftplan cannot express it."""
    tps = published_tokens_per_s(row)
    if tps is None:
        return "no throughput published"
    card = card_for(row)
    if card is None:
        return f"no card yet ({row['model']})"
    gpu = gpu_for(row)
    if gpu is None:
        return f"GPU not known ({row['gpu']})"
    src = source_of(row)
    if src == "torchtune":
        if "compile" in row["attention"]:
            return "torch.compile fuses the elementwise kernels peftplan times one by one"
        if "packed" not in row["seq_note"]:
            return "unpacked, padded to the longest sample: sequence lengths unknown"
        return ("packed with per-document causal masks (torchtune attention_utils.packed_block_causal_mask): "
                "attention spans unknown "
                "document lengths")
    if src != "fms":
        return f"no rule maps {src} rows yet"
    method = row["method"]
    plan = Plan(method="full" if method == "full" else method, batch_size=row["batch_size"], seq_len=row["seq_len"],
                dtype="bf16", optimizer="adamw", grad_checkpointing=True, attention="sdpa")
    stack = timing.Stack(reentrant=True)  # transformers 4.48 Trainer: use_reentrant defaults to True
    if method in ("lora", "qlora"):
        dropout = 0.1 if "lora_dropout 0.1" in row["notes"] else 0.0
        plan = replace(plan, r=row["r"], targets=",".join(t for t in row["targets"].split(",")), dropout=dropout)
    if method == "lora":
        stack = replace(stack, adapter_dtype="fp32")  # peft autocast_adapter_dtype, no bf16 autocast
    if method == "qlora":
        plan = replace(plan, kbit_prep="fmsplugin" not in row["id"])
        if "fmsplugin" in row["id"] and "adapter_dtype" in {f.name for f in fields(plan)}:
            # fms-acceleration's fused-ops plugin runs the adapters in the base's bf16 (its fused LoRA kernels
            # take one dtype); standard peft keeps them in fp32
            plan = replace(plan, adapter_dtype="bf16")
    return ThroughputCase(row["id"], src, card, gpu, plan, stack, tps)


# ---------------------------------------------------------------- predicted vs published


@dataclass(frozen=True)
class ThroughputResult:
    case: ThroughputCase
    predicted_tokens_per_s: float
    role: str  # "fit" (the constants were fitted to it) or "check"

    @property
    def error(self) -> float:
        """(predicted − published) / published."""
        return self.predicted_tokens_per_s / self.case.published_tokens_per_s - 1.0


def predict(case: ThroughputCase, eff: timing.Efficiency = timing.EFFICIENCY) -> float:
    card, gpu = load_card(case.card), load_gpu(case.gpu)
    small = gpu.fp32_tflops if case.stack.adapter_dtype == "fp32" else None
    ph = timing.phase_seconds(card, case.plan, peak_tflops(gpu, case.plan.dtype), gpu.mem_bandwidth_gbs,
                              case.stack, eff, small_peak_tflops=small)
    return case.plan.tokens / ph.total


def throughput_cases(rows: list[dict]) -> tuple[list[ThroughputCase], list[tuple[dict, str]]]:
    """Rows with a published throughput, split into expressible cases and (row, reason)."""
    cases, skipped = [], []
    for row in rows:
        c = throughput_case(row)
        if isinstance(c, ThroughputCase):
            cases.append(c)
        elif c != "no throughput published":
            skipped.append((row, c))
    return cases, skipped


def throughput_results(cases: list[ThroughputCase], eff: timing.Efficiency = timing.EFFICIENCY
                       ) -> list[ThroughputResult]:
    return [ThroughputResult(c, predict(c, eff), "fit" if c.row_id in timing.FIT_ROWS else "check") for c in cases]


def fit_efficiency(cases: list[ThroughputCase]) -> timing.Efficiency:
    """Least squares on log(predicted/published) over the FIT_ROWS cases: a grid over the GEMM and bandwidth
    fractions (step 0.01); the attention fraction stays at the FlashAttention-2 figure in EFFICIENCY."""
    fit = [c for c in cases if c.row_id in timing.FIT_ROWS]
    best, best_err = timing.EFFICIENCY, math.inf
    for g in range(40, 96):
        for b in range(40, 96):
            eff = replace(timing.EFFICIENCY, gemm=g / 100, bandwidth=b / 100)
            err = sum(math.log(predict(c, eff) / c.published_tokens_per_s) ** 2 for c in fit)
            if err < best_err:
                best, best_err = eff, err
    return best


def throughput_table(rows: list[dict]) -> str:
    """The README table: per row predicted vs published, per source median/max |error|, and the rows left out."""
    cases, skipped = throughput_cases(rows)
    results = throughput_results(cases)
    lines = ["| row | model | method | GPU | published tok/s | predicted | error | role |",
             "|---|---|---|---|---:|---:|---:|---|"]
    for r in results:
        c = r.case
        lines.append(f"| {c.row_id} | {c.card} | {c.plan.method} | {c.gpu} | {c.published_tokens_per_s:,.0f} | "
                     f"{r.predicted_tokens_per_s:,.0f} | {r.error:+.1%} | {r.role} |")
    lines.append("")
    lines.append("| source | role | rows | median abs error | max abs error |")
    lines.append("|---|---|---:|---:|---:|")
    for src in sorted({r.case.source for r in results}):
        for role in ("fit", "check"):
            errs = [abs(r.error) for r in results if r.case.source == src and r.role == role]
            if errs:
                lines.append(f"| {src} | {role} | {len(errs)} | {statistics.median(errs):.1%} | {max(errs):.1%} |")
    checks = [abs(r.error) for r in results if r.role == "check"]
    if checks:
        lines.append(f"| all | check | {len(checks)} | {statistics.median(checks):.1%} | {max(checks):.1%} |")
    lines.append("")
    lines.append("Published throughput rows peftplan cannot express:")
    lines.append("")
    for row, reason in skipped:
        lines.append(f"- {row['id']} ({published_tokens_per_s(row):,.0f} tok/s): {reason}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fit", action="store_true", help="refit the efficiency constants on timing.FIT_ROWS")
    args = ap.parse_args()
    rows = load_rows()
    if args.fit:
        cases, _ = throughput_cases(rows)
        print(f"fitted on {', '.join(timing.FIT_ROWS)}:\n  {fit_efficiency(cases)}\n  in timing.py: "
              f"{timing.EFFICIENCY}")
        return
    print(throughput_table(rows))


if __name__ == "__main__":
    main()
