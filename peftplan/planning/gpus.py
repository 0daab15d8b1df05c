"""GPU cards: memory, dense peak rates, bandwidth and an indicative price, one TOML file per card.

Read from `profiles/gpus/NAME.toml`; no torch import. Two memory figures per card:

    memory_bytes         the total NVML (nvidia-smi) reports, e.g. 81,559 MiB for an H100 80GB
    usable_memory_bytes  the total CUDA hands out (`cudaMemGetInfo` total, torch's "total capacity" in an OOM
                         message): NVML's total less the memory the driver reserves. A step fits when its peak
                         as NVML sees it (CUDA context included) stays under this. The figures are the ones
                         torch reports on recent drivers, rounded down to whole MiB.

Rates are dense tensor-core TFLOP/s from the vendor datasheets (structured sparsity doubles them, and is not
used here); `fp32_tflops` is the plain (non-tensor) FP32 rate. GeForce cards give the FP32-accumulate rate,
which is what PyTorch's fp16/bf16 matmuls use.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

from peftplan.planning.cards import load_registry
from peftplan.errors import PlanError, suggest

GPUS_DIR = Path(__file__).resolve().parents[2] / "profiles" / "gpus"
DTYPES = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class GpuCard:
    name: str  # registry key used on the CLI, e.g. "h100-sxm"
    full_name: str
    memory_bytes: int  # total device memory as NVML reports it
    usable_memory_bytes: int  # what CUDA can allocate: the total less the driver's reservation
    bf16_tflops: float  # dense tensor-core rate; 0 where the card has no bf16 (T4, V100)
    fp16_tflops: float  # dense tensor-core rate
    fp32_tflops: float  # CUDA-core FP32 (no TF32)
    mem_bandwidth_gbs: float  # GB/s (10^9 bytes)
    price_per_hour_usd: float  # indicative on-demand cloud price for one GPU
    source: str  # datasheet URL

    def __post_init__(self) -> None:
        if not 0 < self.usable_memory_bytes <= self.memory_bytes:
            raise PlanError(f"GPU card '{self.name}': usable memory must be positive and at most the total")
        for f in ("fp16_tflops", "fp32_tflops", "mem_bandwidth_gbs"):
            if getattr(self, f) <= 0:
                raise PlanError(f"GPU card '{self.name}': {f} must be positive, got {getattr(self, f)}")
        if self.bf16_tflops < 0 or self.price_per_hour_usd < 0:
            raise PlanError(f"GPU card '{self.name}': bf16_tflops and price_per_hour_usd must not be negative")


@cache
def gpu_registry() -> dict[str, GpuCard]:
    """All shipped GPU cards by name."""
    return load_registry(GPUS_DIR, GpuCard, "GPU card")


def load_gpu(name: str) -> GpuCard:
    """A GPU card by registry name (case-insensitive)."""
    cards = gpu_registry()
    if name in cards:
        return cards[name]
    lowered = {k.lower(): v for k, v in cards.items()}
    if name.lower() in lowered:
        return lowered[name.lower()]
    raise suggest(name, list(cards), "gpu")


def peak_tflops(gpu: GpuCard, dtype: str) -> float:
    """Dense peak TFLOP/s of the card for a compute dtype ("bf16", "fp16" or "fp32")."""
    if dtype not in DTYPES:
        raise PlanError(f"unknown dtype '{dtype}' (choose from {', '.join(DTYPES)})")
    rate = {"bf16": gpu.bf16_tflops, "fp16": gpu.fp16_tflops, "fp32": gpu.fp32_tflops}[dtype]
    if rate <= 0:
        raise PlanError(f"{gpu.full_name} has no bf16 support; use fp16 or fp32")
    return rate


__all__ = ["GpuCard", "DTYPES", "gpu_registry", "load_gpu", "peak_tflops"]
