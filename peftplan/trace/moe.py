"""The routing the trace forces on mixture-of-experts blocks, stated so the estimate can assume the same.

A router's choice depends on the data, and fake tensors hold none. transformers 5's routers (MixtralTopKRouter,
Qwen3MoeTopKRouter, GptOssTopKRouter, DeepseekV2TopkRouter, ...) all return (logits, top-k weights, top-k
indices); `forced_routing` lets each router compute its logits, softmax and top-k as usual (their memory is
real) and then overwrites the (t, k) indices in place (through `.data`: top-k saved them for its backward)
with a rule:

    balanced   token i's j-th choice is expert (i·k + j) mod E: every expert gets ⌊t·k/E⌋ or ⌈t·k/E⌉ tokens
    worst      every token picks experts 0 .. k−1: k experts get all t tokens, the other E − k none

(`peftplan.planning.moe.tokens_per_expert` computes the same counts.) On real tensors (a CPU run, `peftplan
profile`) these are the indices the experts then use. Under fake tensors the values do not exist, and they need
not: transformers 5's default experts kernel (`grouped_mm_experts_forward`, transformers/integrations/moe.py)
sorts the S = t·k (token, expert) pairs and runs one grouped GEMM over all of them with per-expert offsets, so
every tensor it makes has S rows whatever the routing — which is why the traced peak, and the estimate, are the
same for both rules.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

ROUTINGS = ("balanced", "worst")


def is_router(module: nn.Module) -> bool:
    """transformers 5's top-k routers, which return (logits, weights, indices)."""
    return type(module).__name__.lower().endswith("topkrouter")


def routed_indices(tokens: int, k: int, n_experts: int, routing: str, device=None) -> torch.Tensor:
    """(t, k) int64 expert ids under the rule (module docstring)."""
    if routing == "worst":
        return torch.arange(k, device=device).expand(tokens, k)
    return (torch.arange(tokens * k, device=device) % n_experts).view(tokens, k)


def _n_experts(router: nn.Module) -> int:
    n = getattr(router, "num_experts", None) or getattr(router, "n_routed_experts", None)
    return int(n) if n else int(router.weight.shape[0])


@contextmanager
def forced_routing(model: nn.Module, routing: str):
    """While open, every top-k router of `model` returns the rule's indices (in place: top-k has saved its own
    indices tensor for backward, and no new tensor may outlive the call)."""
    if routing not in ROUTINGS:
        raise ValueError(f"unknown MoE routing {routing!r}")
    routers = [m for m in model.modules() if is_router(m)]

    def wrap(router: nn.Module):
        forward = router.forward

        def forced(*args, **kwargs):
            out = forward(*args, **kwargs)
            indices = out[-1]
            with torch.no_grad():  # through .data: top-k saved this tensor, its version must not change
                indices.data.copy_(routed_indices(indices.shape[0], indices.shape[-1], _n_experts(router), routing,
                                             indices.device).view_as(indices))
            return out
        return forward, forced

    saved = []
    for m in routers:
        _, forced = wrap(m)
        saved.append((m, m.__dict__.get("forward")))  # an instance-level forward, if one was already set
        m.forward = forced
    try:
        yield len(routers)
    finally:
        for m, own in saved:
            if own is None:
                del m.forward  # the class's forward again
            else:
                m.forward = own
