"""CPU stand-ins for the CUDA backend and for NVML, for the tests and `gpu_validate.py --dry-run`.

`FakeCuda` plays a device whose memory follows a script (stage -> (current, peak allocated, peak reserved bytes)),
usually made from the estimate by `script_from_estimate` (reserved = the estimate's caching-allocator model,
planning/allocator.py, not a fragmentation constant of its own), and raises torch's OutOfMemoryError where the
script says so.
`FakeNvml` answers the few pynvml calls the profiler makes; its `used` comes from a function (a FakeCuda's
reserved pool plus a context, or any series a test wants). Results made with them say `simulated: true`.
"""
from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

GiB = 2**30
MiB = 2**20
POOL_ROUND = 2 * MiB  # the caching allocator grows its pool in blocks of at least 2 MiB


class NVMLError(Exception):
    def __init__(self, value: int = 999, text: str = "fake NVML error") -> None:
        super().__init__(text)
        self.value = value


class NVMLError_LibraryNotFound(NVMLError):  # noqa: N801 - pynvml's name
    def __init__(self) -> None:
        super().__init__(12, "NVML Shared Library Not Found")


class FakeNvml:
    """The pynvml calls the profiler makes. `missing=True` behaves like a machine without the driver."""

    NVMLError = NVMLError
    NVMLError_LibraryNotFound = NVMLError_LibraryNotFound

    def __init__(self, used: Callable[[], int] = lambda: 0, total_bytes: int = 80 * GiB,
                 name: str = "NVIDIA H100 80GB HBM3 (simulated)", driver: str = "000.00 (simulated)",
                 missing: bool = False) -> None:
        self.used, self.total_bytes, self.name, self.driver, self.missing = used, total_bytes, name, driver, missing
        self.calls = 0

    def nvmlInit(self) -> None:  # noqa: N802
        if self.missing:
            raise NVMLError_LibraryNotFound()

    def nvmlShutdown(self) -> None:  # noqa: N802
        pass

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int):  # noqa: N802
        if index != 0:
            raise NVMLError(2, "Invalid Argument")
        return ("fake-gpu", index)

    def nvmlDeviceGetMemoryInfo(self, handle):  # noqa: N802
        self.calls += 1
        used = int(self.used())
        return SimpleNamespace(used=used, total=self.total_bytes, free=self.total_bytes - used)

    def nvmlDeviceGetName(self, handle) -> str:  # noqa: N802
        return self.name

    def nvmlSystemGetDriverVersion(self) -> str:  # noqa: N802
        return self.driver


class FakeCuda:
    """A device on the CPU: tensors live on "cpu"; memory statistics follow `script`."""

    simulated = True
    device = "cpu"

    def __init__(self, total_bytes: int = 80 * GiB, context_bytes: int = 520 * MiB, idle_bytes: int = 4 * MiB,
                 name: str = "NVIDIA H100 80GB HBM3 (simulated)") -> None:
        self.total_bytes, self.context_bytes, self.idle_bytes = total_bytes, context_bytes, idle_bytes
        self.name = name
        self.initialised = False
        self.script: dict[str, tuple[int, ...]] = {}
        self.oom_stage: str | None = None
        self.allocated = self.reserved = self.peak_allocated = self.peak_reserved = 0
        self.syncs = 0

    # -- what the test or the dry-run sets up for the next configuration
    def expect(self, script: dict[str, tuple[int, ...]], oom_stage: str | None = None) -> None:
        """stage -> (current, peak) or (current, peak, reserved); without reserved the pool is the peak rounded
        up to the allocator's 2 MiB segments."""
        self.script, self.oom_stage = dict(script), oom_stage

    def nvml_used(self) -> int:
        return self.idle_bytes + (self.context_bytes + self.reserved if self.initialised else 0)

    def nvml(self, **kwargs) -> FakeNvml:
        return FakeNvml(used=self.nvml_used, total_bytes=self.total_bytes, name=self.name, **kwargs)

    # -- the backend interface of run.CudaBackend
    def init(self) -> None:
        self.initialised = True

    def synchronize(self) -> None:
        self.syncs += 1

    def empty_cache(self) -> None:
        self.reserved = _pool(self.allocated)

    def reset_peak(self) -> None:
        self.peak_allocated, self.peak_reserved = self.allocated, self.reserved

    def stats(self) -> tuple[int, int, int, int]:
        return self.allocated, self.reserved, self.peak_allocated, self.peak_reserved

    def enter(self, stage: str) -> None:
        if stage == self.oom_stage:
            import torch

            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                f"{self.total_bytes / GiB:.2f} GiB (simulated)")
        if stage not in self.script:
            return
        current, peak, *reserved = self.script[stage]
        self.allocated = current
        self.peak_allocated = max(self.peak_allocated, peak, current)
        self.reserved = max(self.reserved, _pool(max(reserved or [peak], default=peak)))
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    def is_oom(self, exc: BaseException) -> bool:
        import torch

        return isinstance(exc, torch.OutOfMemoryError)

    def facts(self) -> dict:
        import torch

        return {"name": self.name, "total_bytes": self.total_bytes, "compute_capability": "9.0",
                "cuda_version": "simulated", "torch_version": torch.__version__}


def _pool(nbytes: int) -> int:
    return -(-nbytes // POOL_ROUND) * POOL_ROUND


def script_from_estimate(est) -> dict[str, tuple[int, ...]]:
    """Stage -> (current, peak allocated, peak reserved) bytes that make FakeCuda show the estimate's figures:
    tensors (`Memory.tensor_bytes`) and torch reserved (`Memory.reserved_bytes`, the allocator model)."""
    by_phase = {m.phase: m for m in est.phases}
    fwd = by_phase["forward"]
    weights = fwd.frozen_weights_bytes + fwd.trainable_weights_bytes
    steady = weights + fwd.optimizer_states_bytes
    script = {"build": (weights, weights), "ready": (weights, weights), "end": (steady, steady)}
    for phase, m in by_phase.items():
        script[phase] = (steady, m.tensor_bytes, m.reserved_bytes)
    return script


class ToyStepApi:
    """A stand-in for `peftplan.measure.step` with its four calls: an embedding and one linear layer trained
    with AdamW, announcing the same phases. Builds in milliseconds and imports no transformers."""

    def build_model(self, card, plan, device="cpu", *, seed: int = 0):
        import torch
        from torch import nn

        torch.manual_seed(seed)
        d = min(card.d_model, 64)
        model = nn.Sequential(nn.Embedding(card.vocab_size, d), nn.Linear(d, card.vocab_size)).to(device)
        return model, None

    def make_batch(self, card, plan, device) -> dict:
        import torch

        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, card.vocab_size, (plan.batch_size, plan.seq_len), generator=g).to(device)
        return {"input_ids": ids, "labels": ids.clone()}

    def make_optimizer(self, model, plan):
        import torch

        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def train_step(self, model, batch, optimizer, plan, on_phase=None):
        import torch.nn.functional as F

        phase = on_phase or (lambda name: None)
        phase("forward")
        logits = model(batch["input_ids"])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten())
        phase("backward")
        loss.backward()
        phase("optimizer")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        phase("end")
        return loss.detach()


def toy_card(name: str = "toy-llama"):
    """A two-block Llama-shaped card of toy sizes (tests)."""
    from peftplan.planning.cards import ModelCard

    return ModelCard(name=name, source="peftplan.profile.fake", model_type="llama", d_model=64, n_layers=2,
                     n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128, vocab_size=256, max_positions=512,
                     gated_mlp=True, activation="silu", tie_embeddings=False, attention_bias=False,
                     attention_out_bias=False, mlp_bias=False, norm="rmsnorm", positions="rotary")
