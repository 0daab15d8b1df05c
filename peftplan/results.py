"""Typed, frozen results of the planner. The CLI and the HTML report render these; `--json` is `asdict`."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from peftplan.planning.params import ParamCounts
from peftplan.plan import Plan

SCHEMA_VERSION = 1  # bump when a field of the JSON changes meaning or disappears

PHASES = ("forward", "backward", "optimizer")


@dataclass(frozen=True)
class Memory:
    """Live bytes by component at the peak of one phase of a steady-state step (step ≥ 2)."""

    phase: str  # forward | backward | optimizer: the phase whose peak this is
    frozen_weights_bytes: int  # frozen base weights (NF4 with constants for QLoRA) and buffers
    trainable_weights_bytes: int
    gradients_bytes: int
    optimizer_states_bytes: int
    activations_bytes: int  # tensors saved for backward (and the residual stream at the peak)
    logits_bytes: int  # logits, their fp32 upcast, the loss and the logits' gradient
    temporaries_bytes: int  # transient buffers: optimizer-step temporaries, dequantized NF4 weight, ...
    cuda_context_bytes: int  # CUDA context + cuBLAS workspace: outside torch's allocator
    allocator_overhead_bytes: int  # caching allocator rounding and fragmentation (reserved − allocated)
    communication_bytes: int = 0  # several GPUs: gathered parameters in flight, gradient buckets (distributed.py)

    @property
    def tensor_bytes(self) -> int:
        """What torch.cuda.max_memory_allocated sees (and what the fake-tensor trace counts)."""
        return (self.frozen_weights_bytes + self.trainable_weights_bytes + self.gradients_bytes
                + self.optimizer_states_bytes + self.activations_bytes + self.logits_bytes
                + self.temporaries_bytes + self.communication_bytes)

    @property
    def reserved_bytes(self) -> int:
        """What torch.cuda.max_memory_reserved sees."""
        return self.tensor_bytes + self.allocator_overhead_bytes

    @property
    def device_bytes(self) -> int:
        """What NVML sees: reserved plus the CUDA context."""
        return self.reserved_bytes + self.cuda_context_bytes

    def components(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name.endswith("_bytes")}


@dataclass(frozen=True)
class Time:
    """Time and cost of the plan on one GPU card: a roofline per phase (planning/timing.py)."""

    gpu: str
    flops_per_token: float  # every matmul and attention product of one step / (b·s)
    flops_per_step: float
    utilisation: float  # model-FLOPs utilisation the predicted time implies (FLOPs / time / peak)
    peak_tflops: float
    step_time_s: float
    tokens_per_s: float
    tokens: int  # the data budget (--tokens); 0 if none given
    gpu_hours: float
    cost_usd: float
    mem_bandwidth_gbs: float = 0.0  # the card's DRAM bandwidth the roofline used
    gemm_s: float = 0.0  # step time by kind of work: Linear / LoRA / adapter products
    attention_s: float = 0.0  # attention kernels
    memory_s: float = 0.0  # memory-bound kernels: norms, activations, loss, QLoRA dequantization
    optimizer_s: float = 0.0  # the optimizer step


@dataclass(frozen=True)
class Estimate:
    model: str
    plan: Plan
    params: ParamCounts
    phases: tuple[Memory, ...]  # one per phase, in PHASES order
    gpu: str | None = None
    gpu_memory_bytes: int | None = None  # usable memory of the GPU card
    time: Time | None = None
    warnings: tuple[str, ...] = ()
    strategy: str = "none"  # resolved sharding strategy; phases are per GPU
    cpu_offload_bytes: int = 0  # host memory per rank for offloaded states/parameters
    moe: object | None = None  # planning.moe.Routing of a mixture-of-experts card (None: dense)
    schema_version: int = SCHEMA_VERSION

    @property
    def peak(self) -> Memory:
        """The phase with the largest device footprint."""
        return max(self.phases, key=lambda m: m.device_bytes)

    @property
    def peak_bytes(self) -> int:
        return self.peak.device_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory_bytes is None else self.peak_bytes <= self.gpu_memory_bytes

    def to_dict(self) -> dict:
        d = asdict(self)
        d["params"]["total"] = self.params.total
        d["peak_phase"] = self.peak.phase
        d["peak_bytes"] = self.peak_bytes
        d["peak_tensor_bytes"] = self.peak.tensor_bytes
        d["peak_reserved_bytes"] = self.peak.reserved_bytes
        d["fits"] = self.fits
        return d
