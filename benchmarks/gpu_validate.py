"""The GPU validation grid: one command, a time budget, every result written as it completes.

    python benchmarks/gpu_validate.py --out DIR [--budget-s 420] [--only REGEX] [--skip-existing DIR]
    python benchmarks/gpu_validate.py --out DIR --dry-run      # CPU: tiny cards, simulated CUDA and NVML

Run it through `benchmarks/gpu_validate.sh`, which first installs bitsandbytes from the wheel in `.whl/` on a
machine without it. Points are ordered by value, so whatever the budget cuts off matters least:

    1 memory      every method on a small and a 1B card, LoRA/QLoRA on 7-8B; b=4, s=512        (issues 5, 7)
    2 ckpt        the same with gradient checkpointing
    3 shape       a second batch × sequence point, b=1, s=2048
    4 throughput  tokens/s without sampling or phase syncs, per method, ±checkpointing          (issue 8)
    5 overhead    NVML sampling on vs off; peft's LoRA vs ours on the same base                 (issue 8)
    6 more        the remaining cards and methods, 8-bit/paged optimizers, full on 7-8B (does not fit)

Writes to DIR: `measured/*.json` (one per configuration, the files to commit under profiles/measured/),
`progress.log` (a line per point, as it happens) and `run.json` (environment, grid, counts, error summaries).
Past --budget-s (or on SIGINT, which the .sh's timeout sends) it starts nothing new and finishes cleanly.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peftplan.planning.cards import ModelCard, registry  # noqa: E402
from peftplan.errors import PlanError  # noqa: E402
from peftplan.plan import Plan  # noqa: E402
from peftplan.profile.grid import GridPoint, dedupe, run_grid  # noqa: E402
from peftplan.profile.nvml import GpuUnavailable  # noqa: E402
from peftplan.profile.store import Measurement, Settings, completed_keys, load_dir, save, write_atomic  # noqa: E402

GiB = 2**30
SMALL = ("opt-125m",)
MID = ("llama-3.2-1b", "opt-1.3b")
LARGE = ("llama-3.1-8b", "opt-6.7b")
MORE = ("opt-350m", "opt-2.7b")
# cards named by the issues, in order of preference when a registry spells a family differently
ALIASES = {"llama-3.2-1b": ("llama-3.2-1b", "llama-3.2-1B", "tinyllama-1.1b"),
           "llama-3.1-8b": ("llama-3.1-8b", "llama-3-8b", "llama-3.1-8B", "llama-2-7b")}
METHODS = ("full", "top", "adapter", "lora", "qlora")
MEMORY = Settings(steps=3, warmup=1, tag="memory")
THROUGHPUT = Settings(steps=5, warmup=2, nvml=False, phase_sync=False, tag="throughput")
OVERHEAD_STEPS = 10
START_MARGIN_S = 20.0  # start no point with less than this left: a 7-8B point takes about that long


# ---------------------------------------------------------------- the grid


def resolve(name: str, known: set[str]) -> str | None:
    for alias in ALIASES.get(name, (name,)):
        if alias in known:
            return alias
    return None


def validation_points(known: set[str]) -> tuple[list[GridPoint], list[str]]:
    """The grid in order of value, over the cards `known` has; and the wanted cards it lacks."""
    missing = sorted({n for n in (*SMALL, *MID, *LARGE, *MORE) if resolve(n, known) is None})
    have = lambda names: [c for n in names if (c := resolve(n, known))]  # noqa: E731
    b4 = dict(batch_size=4, seq_len=512)
    b1 = dict(batch_size=1, seq_len=2048)
    pts: list[GridPoint] = []

    def add(models, methods, settings=MEMORY, **plan):
        for model in models:
            for method in methods:
                pts.append(GridPoint(model, Plan(method=method, **plan), settings))

    # 1 memory: the pipeline first on the smallest card, then every method where it fits
    add(have(SMALL), ("full", "lora", "qlora"), **b4)
    add(have(MID), METHODS, **b4)
    add(have(LARGE), ("lora", "qlora"), **b4)
    add(have(LARGE[:1]), ("qlora",), optimizer="paged-adamw8bit", **b4)
    # 2 gradient checkpointing
    add(have(MID), METHODS, grad_checkpointing=True, **b4)
    add(have(LARGE), ("lora", "qlora"), grad_checkpointing=True, **b4)
    # 3 a second batch × sequence point
    add(have(MID), ("full", "adapter", "lora", "qlora"), **b1)
    add(have(LARGE), ("lora", "qlora"), **b1)
    add(have(LARGE), ("qlora",), grad_checkpointing=True, **b1)
    # 4 throughput (issue 8): no sampler, no phase syncs
    add(have(MID[1:]), ("full", "adapter", "lora", "qlora"), THROUGHPUT, **b4)
    add(have(MID[1:]), ("full", "lora"), THROUGHPUT, grad_checkpointing=True, **b4)
    add(have(LARGE[:1]), ("lora", "qlora"), THROUGHPUT, **b4)
    add(have(LARGE[:1]), ("lora", "qlora"), THROUGHPUT, grad_checkpointing=True, **b4)
    # 5 the profiler's own cost, alternated; peft's LoRA against ours on the same base
    for i in (1, 2):
        for nvml in (False, True):
            s = Settings(steps=OVERHEAD_STEPS, warmup=2, nvml=nvml, phase_sync=False, tag=f"nvml-overhead-{i}")
            add(have(MID[1:]), ("lora",), s, **b4)
    for impl in ("peftplan", "peft"):
        s = Settings(steps=5, warmup=2, phase_sync=False, impl=impl, tag="peft-compare")
        add(have(MID), ("lora",), s, **b4)
        add(have(LARGE[:1]), ("lora",), s, **b4)
    # 6 the rest
    add(have(MORE), METHODS, **b4)
    add(have(SMALL + MID), ("qlora",), optimizer="adamw8bit", **b4)
    add(have(MID), ("lora",), optimizer="adamw8bit", **b4)
    add(have(LARGE), ("top", "adapter"), **b4)
    add(have(LARGE), ("full",), **b4)  # does not fit in 80 GB: records the memory at failure
    add(have(LARGE), ("full",), grad_checkpointing=True, optimizer="adamw8bit", **b4)
    add(have(SMALL + MORE), ("full", "lora", "qlora"), grad_checkpointing=True, **b4)
    return dedupe(pts), missing


# ---------------------------------------------------------------- the CPU stand-in (--dry-run)


def tiny(card: ModelCard) -> ModelCard:
    """The card's family in miniature: same model type and structure, toy sizes."""
    gqa = card.n_kv_heads != card.n_heads
    return replace(card, name=f"{card.name}-tiny", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2 if gqa else 4,
                   head_dim=16, d_ff=128 if card.gated_mlp else 256, vocab_size=512,
                   embed_proj_dim=32 if card.embed_proj_dim else 0)


def oom_stage(est, capacity_bytes: int) -> str | None:
    """Where a GPU of `capacity_bytes` would run out, by the estimate: the first phase past it."""
    for m in est.phases:
        weights = m.frozen_weights_bytes + m.trainable_weights_bytes + m.cuda_context_bytes
        if weights > capacity_bytes:
            return "build"
        if m.device_bytes > capacity_bytes:
            return m.phase
    return None


# ---------------------------------------------------------------- output


def point_line(i: int, n: int, elapsed_s: float, p: GridPoint, m: Measurement | None, error: str) -> str:
    head = f"[{i + 1}/{n} {elapsed_s:6.1f}s] {p.label}:"
    if m is None:
        return f"{head} error {error}"
    if m.status != "ok":
        f = m.failure
        return (f"{head} {m.status} in {f.stage} at {f.peak_reserved_bytes / GiB:.2f} GiB reserved "
                f"({m.seconds:.1f}s) {f.message[:160]}")
    peak = next((r for r in m.comparison if r.name == "peak.reserved"), None)
    err = f" (estimate {100 * peak.rel_error:+.1f}%)" if peak and peak.rel_error is not None else ""
    tps = f", {m.timing.tokens_per_s:,.0f} tok/s" if m.timing else ""
    return f"{head} ok {m.peak_reserved_bytes / GiB:.2f} GiB reserved{err}{tps} ({m.seconds:.1f}s)"


class LineObserver:
    """One line per point on stdout and in progress.log, flushed as it happens."""

    def __init__(self, log_path: Path, clock=time.monotonic) -> None:
        self.log = log_path.open("a")
        self.clock, self.t0, self.n = clock, clock(), 0

    def started(self, total: int) -> None:
        self.n = total
        self._emit(f"grid: {total} point(s)")

    def point_started(self, index: int, point: GridPoint) -> None:
        pass

    def point_done(self, index: int, point: GridPoint, result, error: str) -> None:
        self._emit(point_line(index, self.n, self.clock() - self.t0, point, result, error))

    def _emit(self, line: str) -> None:
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def close(self) -> None:
        self.log.close()


def ratio_summary(measurements: list[Measurement]) -> dict:
    """Issue 8's pairs: NVML sampling on/off (step time), peft vs ours (tokens/s and peak reserved)."""
    ok = [m for m in measurements if m.status == "ok" and m.timing]
    out: dict = {}
    on = [m.timing.step_time_s for m in ok if m.settings.tag.startswith("nvml-overhead") and m.settings.nvml]
    off = [m.timing.step_time_s for m in ok if m.settings.tag.startswith("nvml-overhead") and not m.settings.nvml]
    if on and off:
        out["nvml_overhead"] = statistics.median(on) / statistics.median(off) - 1
    pairs = {}
    for m in ok:
        if m.settings.tag == "peft-compare":
            pairs.setdefault((m.model, json.dumps(m.plan.to_dict(), sort_keys=True)), {})[m.settings.impl] = m
    out["peft_compare"] = [
        {"model": ours.model, "tokens_per_s_ratio": ours.timing.tokens_per_s / theirs.timing.tokens_per_s,
         "peak_reserved_ratio": ours.peak_reserved_bytes / theirs.peak_reserved_bytes
         if theirs.peak_reserved_bytes else None}
        for pair in pairs.values() if (ours := pair.get("peftplan")) and (theirs := pair.get("peft"))
    ]
    return out


def manifest(args, env, points, result, missing, started: str, t0: float) -> dict:
    from peftplan.profile.compare import grid_summary

    done = list(result.measurements) if result else []
    return {
        "started_utc": started, "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": time.monotonic() - t0, "budget_s": args.budget_s, "dry_run": args.dry_run,
        "environment": asdict(env) if env else None, "missing_cards": missing,
        "points": [p.label for p in points],
        "finished": bool(result) and not result.stopped_early,
        "interrupted": bool(result and result.interrupted), "out_of_time": bool(result and result.out_of_time),
        "aborted": bool(result and result.aborted),
        "counts": result.counts if result else {}, "errors": list(result.errors) if result else [],
        "not_run": [p.label for p in result.not_run] if result else [],
        "summaries": [asdict(s) for s in grid_summary(done)], "ratios": ratio_summary(done),
    }


# ---------------------------------------------------------------- main


def parse(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="output folder")
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no point after this (seconds)")
    ap.add_argument("--dry-run", action="store_true", help="CPU: tiny cards, simulated CUDA and NVML")
    ap.add_argument("--only", default=None, help="run the points whose label matches this regex")
    ap.add_argument("--skip-existing", type=Path, default=None,
                    help="skip configurations already measured on this GPU in this folder (profiles/measured)")
    ap.add_argument("--list", action="store_true", help="print the grid and exit")
    ap.add_argument("--max-errors-in-a-row", type=int, default=4,
                    help="stop after this many failed points in a row (a broken setup; OOMs do not count)")
    ap.add_argument("--fake-memory-gib", type=float, default=80.0,
                    help="--dry-run: memory of the simulated GPU (where the real cards' estimates run out)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    t0 = time.monotonic()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    args = parse(argv)
    cards = registry()
    points, missing = validation_points(set(cards))
    if args.only:
        points = [p for p in points if re.search(args.only, p.label)]
    if args.list:
        for p in points:
            print(p.label)
        return 0
    if missing:
        print(f"gpu_validate: cards not in the registry, left out: {', '.join(missing)}", file=sys.stderr)
    if not points:
        print("gpu_validate: no points to run", file=sys.stderr)
        return 2

    from peftplan.planning import estimate
    from peftplan.profile import run as run_mod

    fake = None
    try:
        if args.dry_run:
            from peftplan.profile.fake import FakeCuda

            fake = FakeCuda(total_bytes=int(args.fake_memory_gib * GiB))
            session = run_mod.open_session(fake, nvml=fake.nvml())
        else:
            use_nvml = True
            try:
                run_mod.check_gpu()
            except GpuUnavailable as e:  # a GPU without NVML still measures torch's peaks and the time
                run_mod.check_gpu(need_nvml=False)
                print(f"gpu_validate: warning: running without NVML: {e}", file=sys.stderr)
                use_nvml = False
            session = run_mod.open_session(use_nvml=use_nvml)
    except GpuUnavailable as e:
        print(f"gpu_validate: {e}", file=sys.stderr)
        return 2
    env = session.environment
    if args.skip_existing is not None:
        done, _ = load_dir(args.skip_existing)
        keys = completed_keys(done, env.gpu_card or env.gpu_name)
        before = len(points)
        points = [p for p in points if p.key not in keys]
        print(f"gpu_validate: {before - len(points)} point(s) already measured in {args.skip_existing}",
              file=sys.stderr)
        if not points:
            return 0
    out = Path(args.out)
    (out / "measured").mkdir(parents=True, exist_ok=True)
    write_atomic(out / "run.json", json.dumps(manifest(args, env, points, None, missing, started, t0), indent=1))

    def run_point(p: GridPoint) -> Measurement:
        card, plan, settings = cards[p.model], p.plan, p.settings
        if fake is not None:  # the real card's estimate says where the GPU would run out; a toy model runs
            stage = oom_stage(estimate(card, plan), fake.total_bytes)
            card, plan = tiny(card), plan.with_(batch_size=min(plan.batch_size, 2), seq_len=min(plan.seq_len, 32))
            settings = replace(settings, steps=1, warmup=1, interval_s=0.001)
            fake.expect(_script(estimate(card, plan)), stage)
        return run_mod.profile_point(session, card, plan, settings)

    observer = LineObserver(out / "progress.log")
    result = None
    try:
        result = run_grid(points, run_point, save=lambda m: save(m, out / "measured"),
                          isolate=lambda: run_mod.isolate(session.backend), observer=observer,
                          deadline=t0 + args.budget_s - START_MARGIN_S,
                          max_consecutive_errors=args.max_errors_in_a_row)
    finally:
        observer.close()
        doc = manifest(args, env, points, result, missing, started, t0)
        write_atomic(out / "run.json", json.dumps(doc, indent=1))
    for s in doc["summaries"]:
        if s["n"]:
            print(f"{s['metric']}: n={s['n']} median |error| {100 * s['median_abs_error']:.1f}% "
                  f"max {100 * s['max_abs_error']:.1f}% ({s['worst']})")
    print(f"gpu_validate: {doc['counts']} in {doc['seconds']:.0f}s; not run: {len(doc['not_run'])}; "
          f"results in {out / 'measured'}")
    return 0 if result.counts.get("ok", 0) else 1


def _script(est):
    from peftplan.profile.fake import script_from_estimate

    return script_from_estimate(est)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except PlanError as e:
        print(f"gpu_validate: error: {e}", file=sys.stderr)
        sys.exit(2)
