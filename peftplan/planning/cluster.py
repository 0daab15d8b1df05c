"""How many GPUs of which card, with which sharding: the fewest that fit, and the cheapest cluster.

For one model and plan, each (card, strategy) gets the smallest world size W whose per-GPU device peak
(`distributed.shard_phases`) fits the card: W searched over 1, 2, 4, 8 GPUs in one node, then whole nodes of
`gpus_per_node`. Data parallelism keeps the GPU-hours of a token budget (each GPU still processes its own
micro-batches at the single-GPU rate; communication time is not modelled), so a cluster's cost is the card's
price per GPU-hour × the GPU-hours, and W only sets the wall-clock time: the cheapest cluster is the card with the
lowest price per token that fits with some W, fewer GPUs first on ties.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from peftplan.errors import PlanError
from peftplan.plan import Plan
from peftplan.planning.api import estimate
from peftplan.planning.cards import ModelCard, load_card
from peftplan.planning.gpus import load_gpu

DEFAULT_STRATEGIES = ("ddp", "zero2", "zero3", "fsdp")
MAX_GPUS = 512


@dataclass(frozen=True)
class ClusterOption:
    gpu: str
    strategy: str
    gpus: int  # W, fewest that fit; 0: none up to the search's cap
    nodes: int
    peak_bytes: int  # per-GPU device peak at W (0 when nothing fits)
    usable_bytes: int
    tokens_per_s: float  # the whole cluster
    usd_per_hour: float  # the whole cluster
    gpu_hours: float  # for the token budget (0 without one)
    cost_usd: float

    @property
    def fits(self) -> bool:
        return self.gpus > 0


def world_sizes(gpus_per_node: int, max_gpus: int) -> list[int]:
    """1, 2, 4, … up to a node, then whole nodes: the sizes clusters are rented in."""
    out, w = [], 1
    while w < gpus_per_node and w <= max_gpus:
        out.append(w)
        w *= 2
    n = 1
    while n * gpus_per_node <= max_gpus:
        out.append(n * gpus_per_node)
        n += 1
    return out


def fewest_gpus(model: str | ModelCard, plan: Plan, gpu: str, strategy: str, tokens: int = 0,
                gpus_per_node: int = 8, max_gpus: int = MAX_GPUS) -> ClusterOption:
    """The smallest W (see `world_sizes`) at which `plan` under `strategy` fits `gpu`; gpus = 0 if none does."""
    card = model if isinstance(model, ModelCard) else load_card(model)
    g = load_gpu(gpu)
    if gpus_per_node < 1 or max_gpus < 1:
        raise PlanError("gpus per node and the GPU cap must be positive")
    for w in world_sizes(gpus_per_node, max_gpus):
        nodes = max(1, w // gpus_per_node) if w >= gpus_per_node else 1
        if strategy == "fsdp-hybrid" and nodes < 2:
            continue
        p = plan.with_(gpus=w, nodes=nodes, strategy=strategy if w > 1 else "none")
        est = estimate(card, p, gpu=g.name, tokens=tokens)
        if est.fits:
            t = est.time
            return ClusterOption(gpu=g.name, strategy=strategy if w > 1 else "none", gpus=w, nodes=nodes,
                                 peak_bytes=est.peak_bytes, usable_bytes=g.usable_memory_bytes,
                                 tokens_per_s=t.tokens_per_s * w, usd_per_hour=g.price_per_hour_usd * w,
                                 gpu_hours=t.gpu_hours, cost_usd=t.cost_usd)
    return ClusterOption(gpu=g.name, strategy=strategy, gpus=0, nodes=0, peak_bytes=0,
                         usable_bytes=g.usable_memory_bytes, tokens_per_s=0.0, usd_per_hour=0.0, gpu_hours=0.0,
                         cost_usd=0.0)


@dataclass(frozen=True)
class ClusterPlan:
    model: str
    method: str
    tokens: int
    options: tuple[ClusterOption, ...]  # every card × strategy, cheapest fitting first, then those that never fit

    @property
    def cheapest(self) -> ClusterOption | None:
        return self.options[0] if self.options and self.options[0].fits else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cheapest"] = asdict(self.cheapest) if self.cheapest else None
        return d


def cheapest_cluster(model: str | ModelCard, plan: Plan, gpus: Sequence[str],
                     strategies: Sequence[str] = DEFAULT_STRATEGIES, tokens: int = 0,
                     gpus_per_node: int = 8, max_gpus: int = MAX_GPUS) -> ClusterPlan:
    """Fewest GPUs for every card × strategy, ranked by cost per token (by $/hour for a given W when no token
    budget is given), then by fewer GPUs."""
    card = model if isinstance(model, ModelCard) else load_card(model)
    if not gpus or not strategies:
        raise PlanError("give at least one GPU card and one strategy")
    opts = [fewest_gpus(card, plan, g, s, tokens, gpus_per_node, max_gpus) for g in gpus for s in strategies]
    # one GPU needs no strategy: keep that answer once per card
    opts = list({(o.gpu, o.strategy, o.gpus): o for o in opts}.values())

    def key(o: ClusterOption):
        per_token = o.usd_per_hour / o.tokens_per_s if o.tokens_per_s else float("inf")
        return (not o.fits, round(per_token, 12), o.gpus, o.peak_bytes)

    return ClusterPlan(model=card.name, method=plan.method, tokens=tokens, options=tuple(sorted(opts, key=key)))
