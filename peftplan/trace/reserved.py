"""`peftplan trace --reserved`: the traced step's allocations replayed through the caching-allocator model.

Parsing of the step lengths (`--seq-lens`, `--seq-percentiles`) and the rich rendering live here; the replay
itself is pure Python (peftplan/planning/replay.py).
"""
from __future__ import annotations

from peftplan.errors import PlanError
from peftplan.planning.replay import Replay, lengths_from_percentiles


def parse_seq_lens(seq_lens: str | None, percentiles: str | None, steps: int) -> tuple[int, ...] | None:
    """"512,2048,1024" -> (512, 2048, 1024); "50:512,90:1800,100:2048" with `steps` -> lengths drawn from
    that distribution (seed 0). None when neither is given. Raises PlanError on a malformed list."""
    if seq_lens and percentiles:
        raise PlanError("give --seq-lens or --seq-percentiles, not both")
    try:
        if seq_lens:
            out = tuple(int(x) for x in seq_lens.split(",") if x.strip())
            if not out or min(out) < 1:
                raise ValueError
            return out
        if percentiles:
            spec = {}
            for item in percentiles.split(","):
                p, _, v = item.partition(":")
                spec[float(p)] = int(v)
            return lengths_from_percentiles(spec, steps)
    except ValueError:
        raise PlanError(f"bad sequence lengths '{seq_lens or percentiles}': use 512,2048 or 50:512,90:2048") from None
    return None


def _gib(n: float) -> str:
    return f"{n / 2**30:,.3f} GiB"


def render(console, rp: Replay) -> None:
    """Per-phase live / allocated / reserved of the last step, the state at the reserved peak, and, when the
    steps' lengths vary, reserved after each step."""
    from rich.table import Table

    c = rp.config
    conf = ",".join(f"{k}:{v}" for k, v in (("expandable_segments", c.expandable_segments),
                                             ("max_split_size_mb", c.max_split_size_mb),
                                             ("garbage_collection_threshold", c.garbage_collection_threshold or None))
                    if v not in (None, False)) or "defaults"
    t = Table(title=f"caching-allocator replay ({conf}; {rp.allocations:,} allocations, {rp.seconds:.2f} s)",
              title_justify="left")
    for col in ("phase (last step)", "live tensors", "allocated", "reserved", "reserved/live"):
        t.add_column(col, justify="left" if col.startswith("phase") else "right")
    last = max(p.step for p in rp.phases)
    for p in rp.phases:
        if p.step == last and p.peak_live_bytes:
            t.add_row(p.phase, _gib(p.peak_live_bytes), _gib(p.peak_allocated_bytes), _gib(p.peak_reserved_bytes),
                      f"{p.peak_reserved_bytes / p.peak_live_bytes:.3f}")
    console.print(t)
    pk = rp.peak
    console.print(f"max reserved {_gib(rp.peak_reserved_bytes)} (max allocated {_gib(rp.peak_allocated_bytes)}, "
                  f"live {_gib(rp.peak_live_bytes)}): first reached in step {pk.step} {pk.phase} at {pk.op} in "
                  f"{pk.module or '-'}; {pk.segments} segments, largest free block {_gib(pk.largest_free_block_bytes)}, "
                  f"fragmentation {100 * pk.fragmentation:.1f}% of reserved")
    if rp.seq_lens:
        grow = ", ".join(f"{s}→{_gib(r)}" for s, r in zip(rp.seq_lens, rp.reserved_per_step))
        console.print(f"reserved after each step (seq len→max reserved): {grow}")
    if rp.oom:
        console.print(f"[red]out of memory[/red] {rp.oom}")
