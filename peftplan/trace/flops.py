"""Matmul FLOPs of one real training step, counted on the fake-tensor trace.

A TorchDispatchMode sees every aten op the step runs after autograd has expanded it, so forward, backward
(input and weight gradients as autograd really computes them), checkpoint recomputation and the optimizer
are all there. Each matrix product counts 2·m·n·k FLOPs:

    aten.mm(a[m,k], b[k,n])                 2·m·n·k
    aten.addmm(c, a[m,k], b[k,n])           2·m·n·k   (the bias add is not a matmul)
    aten.bmm(a[B,m,k], b[B,k,n])            2·B·m·n·k
    aten.baddbmm(c, a[B,m,k], b[B,k,n])     2·B·m·n·k
    aten._grouped_mm(a, b, offs)            the grouped-GEMM experts (transformers/integrations/moe.py,
                                            `grouped_mm_experts_forward`), with offs splitting one dimension
                                            into the E experts' groups, so the FLOPs do not depend on routing:
                                            a[S,k]·b[E,k,n] 2·S·k·n (forward, input gradient);
                                            a[k,S]·b[S,n] → [E,k,n] 2·k·S·n (weight gradient);
                                            a[E,m,k]·b[k,N] 2·m·k·N; a[E,m,k]·b[E,k,n] 2·E·m·k·n
    transformers.grouped_mm_fallback(x[S,k], w[E,k,n], offs)        2·S·k·n (its loop of mm runs inside
                                            the custom op, unseen); its backward op computes dX and dW: 4·S·k·n
    bitsandbytes.gemm_4bit(A[...,k], B, [n,k], ...)  2·(A.numel()/k)·n·k: bitsandbytes ≥ 0.48 runs a Linear4bit
                                            whose input needs no gradient as one fused dequantize-and-GEMM op
                                            (bitsandbytes/autograd/_functions.py matmul_4bit); with a gradient it
                                            dequantizes and calls F.linear, an mm

Fused attention kernels (SDPA's flash / memory-efficient ops) are not matmuls at the aten level and are not
counted here; eager attention's QKᵀ and P·V are bmm and are. The holder of truth for
`peftplan.planning.timing.step_flops` (tests/test_timing.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from peftplan.planning.cards import ModelCard
from peftplan.plan import Plan

_aten = torch.ops.aten
MATMULS = {_aten.mm.default: "mm", _aten.addmm.default: "addmm", _aten.bmm.default: "bmm",
           _aten.baddbmm.default: "baddbmm", _aten._grouped_mm.default: "grouped_mm"}


def grouped_mm_flops(a, b) -> int:
    """2·m·n·k of torch._grouped_mm(a, b, offs) for each of its four layouts (offs splits the 2-D operand)."""
    if a.dim() == 2 and b.dim() == 3:
        return 2 * a.shape[0] * a.shape[1] * b.shape[2]
    if a.dim() == 2 and b.dim() == 2:
        return 2 * a.shape[0] * a.shape[1] * b.shape[1]
    if a.dim() == 3 and b.dim() == 2:
        return 2 * a.shape[1] * a.shape[2] * b.shape[1]
    return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]


def matmul_flops(op, args) -> int:
    """2·m·n·k (times the batch for bmm) of one aten matmul call; 0 for any other op."""
    kind = MATMULS.get(op)
    if kind is None:
        name = str(op)
        if "gemm_4bit" in name:
            return 2 * args[0].numel() * int(args[2][0])
        if "grouped_mm_fallback_backward" in name:
            return 2 * grouped_mm_flops(args[0], args[1])
        if "grouped_mm_fallback" in name:
            return grouped_mm_flops(args[0], args[1])
        return 0
    if kind == "grouped_mm":
        return grouped_mm_flops(args[0], args[1])
    a, b = (args[0], args[1]) if kind in ("mm", "bmm") else (args[1], args[2])
    if kind == "mm" or kind == "addmm":
        (m, k), n = a.shape, b.shape[1]
        return 2 * m * n * k
    batch, m, k = a.shape
    return 2 * batch * m * b.shape[2] * k


class MatmulCounter(TorchDispatchMode):
    """Sums matmul FLOPs by phase ("forward", "backward", "optimizer"; others under their own name)."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "setup"
        self.by_phase: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flops = matmul_flops(func, args)
        if flops:
            self.by_phase[self.phase] = self.by_phase.get(self.phase, 0) + flops
        return func(*args, **(kwargs or {}))


@dataclass(frozen=True)
class TracedFlops:
    model: str
    plan: Plan
    forward: int  # matmul FLOPs of the forward phase (loss included)
    backward: int  # of the backward phase (checkpoint recomputation included)
    optimizer: int
    seconds: float

    @property
    def total(self) -> int:
        return self.forward + self.backward + self.optimizer


def trace_flops(card: ModelCard, plan: Plan, steps: int = 1, impl: str = "ours") -> TracedFlops:
    """Matmul FLOPs of the last of `steps` training steps of the plan, run on fake tensors (CPU, no memory).
    impl: the LoRA implementation (measure.step.build_model): "peft" for LoRA on fused expert parameters."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from peftplan.measure.step import build_model, make_batch, make_optimizer, train_step
    from peftplan.trace.run import cuda_like

    t0 = time.perf_counter()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        model, _ = build_model(card, plan, "cpu", impl=impl)
        batch = make_batch(card, plan, "cpu")
        optimizer = make_optimizer(model, plan)
    counter = MatmulCounter()

    def on_phase(name: str) -> None:
        counter.phase = name

    with cuda_like(), mode, counter:
        for _ in range(steps):
            counter.by_phase.clear()
            train_step(model, batch, optimizer, plan, on_phase=on_phase)
    got = counter.by_phase
    return TracedFlops(model=card.name, plan=plan, forward=got.get("forward", 0), backward=got.get("backward", 0),
                       optimizer=got.get("optimizer", 0), seconds=time.perf_counter() - t0)
