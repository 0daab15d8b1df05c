"""`peftplan profile` under torchrun: every rank measures its own step, rank 0 keeps one result per point.

torchrun (torch/distributed/run.py) starts one process per GPU and sets RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous (MASTER_ADDR, MASTER_PORT). Each rank profiles as on one GPU, on device LOCAL_RANK; the results are
gathered with `torch.distributed.gather_object` (gloo on the CPU, which also carries Python objects for NCCL
jobs) and rank 0 merges them: its own figures, every rank's peaks in `Measurement.ranks`, and the worst status.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

from peftplan.profile.store import Measurement, RankPeak, measurement_from_dict

WORST = {"ok": 0, "does-not-fit": 1, "error": 2}


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env(env=None) -> World:
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them; one process (rank 0 of 1) without them."""
    env = os.environ if env is None else env
    return World(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def rank_peak(rank: int, m: Measurement) -> RankPeak:
    f = m.failure
    alloc = m.peak_allocated_bytes if m.phases else (f.peak_allocated_bytes if f else 0)
    reserved = m.peak_reserved_bytes if m.phases else (f.peak_reserved_bytes if f else 0)
    return RankPeak(rank=rank, status=m.status, peak_allocated_bytes=alloc, peak_reserved_bytes=reserved,
                    device_name=m.environment.gpu_name)


def merge(per_rank: list[Measurement]) -> Measurement:
    """Rank 0's measurement with every rank's peaks and the worst status of any rank.

    `per_rank[i]` is rank i's result. Raises ValueError on an empty list."""
    if not per_rank:
        raise ValueError("no rank results to merge")
    first = per_rank[0]
    worst = max(per_rank, key=lambda m: WORST.get(m.status, 2))
    merged = replace(first, ranks=tuple(rank_peak(i, m) for i, m in enumerate(per_rank)))
    if worst.status != first.status:
        merged = replace(merged, status=worst.status, failure=worst.failure,
                         warnings=merged.warnings + (f"rank {per_rank.index(worst)}: {worst.status}",))
    return merged


def init(world: World) -> None:
    """Join torchrun's process group (gloo: it carries the gathered objects on any machine)."""
    import torch.distributed as dist

    if world.size > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", rank=world.rank, world_size=world.size)


def gather(world: World, m: Measurement) -> Measurement | None:
    """Every rank's result to rank 0, merged there; None on the other ranks. One process: `m` itself."""
    if world.size == 1:
        return m
    import torch.distributed as dist

    out: list | None = [None] * world.size if world.is_main else None
    dist.gather_object(m.to_dict(), out, dst=0)
    if not world.is_main:
        return None
    return merge([measurement_from_dict(d) for d in out])


def close(world: World) -> None:
    import torch.distributed as dist

    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
