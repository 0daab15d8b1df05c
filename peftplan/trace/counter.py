"""Byte-exact live tensor memory of a running step, by category and phase.

A TorchDispatchMode sees every tensor an op returns; each new untyped storage is recorded by identity
with its size rounded as the CUDA caching allocator rounds it (512 B), and a `weakref.finalize` on the
storage subtracts it when autograd or Python frees it. Under FakeTensorMode no real memory is used, so a
full-size model's step is counted on the CPU. The peak of each phase keeps the per-category split, the
op and the module where it happened.
"""
from __future__ import annotations

import weakref
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from peftplan.planning.memory import rounded

CATEGORIES = ("frozen_weights", "trainable_weights", "gradients", "optimizer_states", "activations", "logits",
              "temporaries")


@dataclass(frozen=True)
class PhasePeak:
    phase: str
    peak_bytes: int
    by_category_bytes: dict[str, int]
    op: str  # the aten op whose output set the peak
    module: str  # the module running then ("" outside any)
    op_index: int
    start_bytes: int  # live when the phase began


def _storage(t: torch.Tensor):
    local = getattr(t, "_local_tensor", None)  # a DTensor (FSDP2 shards): its local shard holds the bytes
    if isinstance(local, torch.Tensor):
        t = local
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


class LiveBytes(TorchDispatchMode):
    """Counts live storages; `phase` and `module` are set by the caller's hooks."""

    def __init__(self, vocab_size: int = 0, record_timeline: bool = True, record_events: bool = False):
        super().__init__()
        # the allocation/free stream the caching-allocator replay consumes (peftplan/planning/replay.py):
        # (action "a"|"f", storage key, bytes requested, stream, phase, op, module, step); one CUDA stream (0)
        self.events: list[tuple] | None = [] if record_events else None
        self.step = 0
        self.op = "(setup)"
        self.vocab_size = vocab_size
        self.live: dict[int, list] = {}
        self.by_category: dict[str, int] = defaultdict(int)
        self.total = 0
        self.phase = "setup"
        self.module = ""
        self.module_stack: list[str] = []  # the running modules, outermost first (module_hooks keeps it)
        self.in_head = False  # allocations after the output head started belong to the logits and loss
        self.ops = 0
        self.peaks: dict[str, PhasePeak] = {}
        self._phase_start = 0
        self.timeline: list[tuple[int, str, int]] = [] if record_timeline else None

    # -- bookkeeping
    def track(self, t: torch.Tensor, category: str) -> None:
        st = _storage(t)
        if st is None:
            return
        key = st._cdata
        if key in self.live:
            return
        n = st.nbytes()
        n = rounded(n) if n else 0
        self.live[key] = [n, category]
        if self.events is not None and n:
            self.events.append(("a", key, st.nbytes(), 0, self.phase, self.op, self.module, self.step))
        self.by_category[category] += n
        self.total += n
        weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            if self.events is not None and entry[0]:
                self.events.append(("f", key, 0, 0, self.phase, self.op, self.module, self.step))
            self.by_category[entry[1]] -= entry[0]
            self.total -= entry[0]

    def resized(self, t: torch.Tensor) -> None:
        """Re-read a storage's size after `storage.resize_()` (FSDP2 frees and re-allocates unsharded parameters
        that way, keeping the storage object): the bytes follow the new size."""
        st = _storage(t)
        if st is None:
            return
        n = st.nbytes()
        n = rounded(n) if n else 0
        entry = self.live.get(st._cdata)
        if entry is None:
            if n:
                self.track(t, self._category_for_new(t))
            return
        delta = n - entry[0]
        entry[0] = n
        self.by_category[entry[1]] += delta
        self.total += delta

    def reclassify(self, t: torch.Tensor, category: str) -> None:
        """Move a tracked tensor's storage to a category (tracking it if new)."""
        st = _storage(t)
        if st is None:
            return
        entry = self.live.get(st._cdata)
        if entry is None:
            self.track(t, category)
            return
        if entry[1] != category:
            self.by_category[entry[1]] -= entry[0]
            self.by_category[category] += entry[0]
            entry[1] = category

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        self.in_head = False
        # a phase starts outside every module; non-reentrant checkpointing stops a block's recomputation early
        # (torch.utils.checkpoint's _StopRecomputationError), so its modules' forward hooks never close
        self.module_stack.clear()
        self.module = ""
        self._phase_start = self.total
        self.peaks[phase] = PhasePeak(phase, self.total, dict(self.by_category), "(start)", self.module, self.ops,
                                      self.total)

    def _category_for_new(self, t: torch.Tensor) -> str:
        if self.phase == "forward":
            return "logits" if self.in_head else "activations"
        if self.phase == "backward":
            if self.vocab_size and t.dim() >= 2 and t.shape[-1] == self.vocab_size and t.shape[-2] != 0:
                return "logits"
            return "temporaries"
        return "temporaries"

    # -- the mode
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.op = str(func.__name__)
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t, self._category_for_new(t))
        self.ops += 1
        peak = self.peaks.get(self.phase)
        if peak is None or self.total > peak.peak_bytes:
            self.peaks[self.phase] = PhasePeak(self.phase, self.total, dict(self.by_category), str(func.__name__),
                                               self.module, self.ops, self._phase_start)
        if self.timeline is not None:
            self.timeline.append((self.ops, self.phase, self.total))
        return out


def module_hooks(model: torch.nn.Module, counter: LiveBytes, head_name: str) -> list:
    """Forward hooks that keep `counter.module` (the innermost running module) and the head flag current.

    No backward hooks: full backward hooks wrap tensors and would change what autograd saves.
    """
    handles, stack = [], counter.module_stack

    def pre(name):
        def hook(mod, args):
            if name in stack:  # re-entered after a recomputation stopped early: drop what it left open
                del stack[stack.index(name):]
            stack.append(name)
            counter.module = name
            if name == head_name or name.endswith("." + head_name):  # peft prefixes "base_model.model."
                counter.in_head = True
        return hook

    def post(name):
        def hook(mod, args, out):
            if name in stack:  # close this module and anything left open inside it
                del stack[stack.index(name):]
            counter.module = stack[-1] if stack else ""
        return hook

    for name, mod in model.named_modules():
        if name:
            handles.append(mod.register_forward_pre_hook(pre(name)))
            handles.append(mod.register_forward_hook(post(name)))
    return handles
