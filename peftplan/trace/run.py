"""`trace()`: run the shared training step on fake tensors and count every live byte.

The model, batch and optimizer are built inside a FakeTensorMode on the CPU device (fake CUDA tensors
abort autograd without a GPU), so a 70B step costs no real memory. Steps after the first are steady
state: optimizer states exist and gradients were freed by zero_grad(set_to_none=True). The last step
is reported.
"""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace

from peftplan.planning.cards import ModelCard
from peftplan.errors import PlanError
from peftplan.plan import Plan
from peftplan.results import PHASES

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class TracePhase:
    phase: str
    peak_bytes: int
    start_bytes: int
    by_category_bytes: dict[str, int]
    op: str
    module: str
    op_index: int


@dataclass(frozen=True)
class Trace:
    model: str
    plan: Plan
    steps: int
    phases: tuple[TracePhase, ...]
    timeline: tuple[tuple[int, str, int], ...]  # (op index, phase, live bytes) over the reported step
    ops: int
    seconds: float
    schema_version: int = SCHEMA_VERSION
    impl: str = "ours"  # who built the LoRA layers: peft or ours
    # allocation/free events of every step (record_events=True): see peftplan.trace.counter.LiveBytes.events
    events: tuple[tuple, ...] = field(default=(), repr=False)
    seq_lens: tuple[int, ...] = ()  # per step, when the steps' lengths vary

    @property
    def peak(self) -> TracePhase:
        return max(self.phases, key=lambda p: p.peak_bytes)

    @property
    def peak_bytes(self) -> int:
        return self.peak.peak_bytes


class TraceError(PlanError):
    """An op that fails under fake tensors: names the op and the module."""


def _decimate(timeline: list, keep: int) -> tuple:
    if len(timeline) <= keep:
        return tuple(timeline)
    stride = len(timeline) / keep
    picked = {int(i * stride) for i in range(keep)}
    # keep every local maximum of the kept windows so peaks survive thinning
    out, window_max = [], None
    for i, point in enumerate(timeline):
        if window_max is None or point[2] > window_max[2]:
            window_max = point
        if i in picked:
            out.append(window_max)
            window_max = None
    return tuple(out)


def _cuda_picks_efficient(query, key, value, attn_mask, kwargs) -> bool:
    """Whether CUDA's SDPA would run the memory-efficient kernel where the CPU falls back to its math path: a
    value head dim unlike the query's (multi-head latent attention, DeepSeek-V2: d_qk = 192, d_v = 128), which
    flash attention refuses and the memory-efficient kernel takes (torch sdp_utils), with no mask and no GQA.
    Only on fake tensors (the trace): the kernel's CUDA op has a fake implementation on any device."""
    from torch._subclasses.fake_tensor import is_fake

    return (is_fake(query) and attn_mask is None and not kwargs.get("enable_gqa")
            and query.shape[-1] != value.shape[-1] and query.shape[-1] == key.shape[-1])


def _trained_bias(query, attn_mask, kwargs) -> bool:
    """Whether the float mask itself needs a gradient (T5's relative position bias when its embedding trains):
    the CPU then falls back to the fp32 math path (b·h·s² probabilities), CUDA's memory-efficient kernel takes
    the bias and returns its gradient (torch sdp_utils: flash refuses masks). Only on fake tensors."""
    from torch._subclasses.fake_tensor import is_fake

    return (is_fake(query) and attn_mask is not None and attn_mask.is_floating_point() and attn_mask.requires_grad
            and not kwargs.get("enable_gqa"))


def _efficient_sdpa(query, key, value, is_causal=False, scale=None, attn_bias=None, **_):
    """CUDA's memory-efficient attention op: saves q, k, v, its output, a fp32 logsumexp per (b, h, s) and the
    bias when one is given."""
    import torch

    return torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, attn_bias, True, 0.0,
                                                                   bool(is_causal), scale=scale)[0]


@contextmanager
def cuda_like():
    """Make the CPU fake-tensor step keep what a CUDA step keeps.

    With fake tensors transformers cannot read position ids or the cache offset, so it assumes packed
    sequences and materialises a b×1×s×s causal mask — which also makes SDPA repeat GQA's key/value heads.
    A real training batch (no padding, no cache) gets `is_causal=True` and `enable_gqa` instead. Dropout
    and SDPA dropout are switched to the kernels CUDA uses (see below).
    """
    import torch
    import transformers.masking_utils as mu

    saved = mu._ignore_causal_mask_sdpa, mu.find_packed_sequence_indices

    def ignore_causal_mask(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size=None):
        q_offset = 0 if isinstance(q_offset, torch.Tensor) else q_offset  # training: no cache, offset 0
        kv_offset = 0 if isinstance(kv_offset, torch.Tensor) else kv_offset
        return saved[0](padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size)

    import torch.nn.functional as F

    dropout, sdpa = F.dropout, F.scaled_dot_product_attention

    def cuda_dropout(input, p=0.5, training=True, inplace=False):
        # CUDA's fused dropout keeps a 1-byte bool mask; the CPU path keeps a noise tensor of the input dtype
        if training and 0 < p < 1:
            return torch.native_dropout(input, p, True)[0]
        return dropout(input, p, training, inplace)

    def cuda_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, **kwargs):
        # CUDA flash / memory-efficient attention keep only the RNG seed and offset for dropout; the CPU
        # kernel falls back to the math path and materialises b·h·s² probabilities. Same memory as CUDA:
        if _cuda_picks_efficient(query, key, value, attn_mask, kwargs):
            return _efficient_sdpa(query, key, value, **kwargs)
        if _trained_bias(query, attn_mask, kwargs):
            return _efficient_sdpa(query, key, value, attn_bias=attn_mask, **kwargs)
        return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=0.0, **kwargs)

    mu._ignore_causal_mask_sdpa = ignore_causal_mask
    mu.find_packed_sequence_indices = lambda position_ids: None  # one unpacked sequence per row
    F.dropout, F.scaled_dot_product_attention = cuda_dropout, cuda_sdpa
    try:
        yield
    finally:
        mu._ignore_causal_mask_sdpa, mu.find_packed_sequence_indices = saved
        F.dropout, F.scaled_dot_product_attention = dropout, sdpa


@contextmanager
def quiet_torch_logs():
    """torch logs a failing fake-tensor op (with its traceback) before raising, transformers warns about config
    fields it fixes itself: the raised error (one line) is enough. bitsandbytes warns that its paged optimizers
    fall back to non-paged state on the CPU (the state the trace counts either way)."""
    import logging
    import warnings

    loggers = [logging.getLogger(n) for n in ("torch", "torch._subclasses", "torch._subclasses.fake_tensor",
                                              "transformers", "bitsandbytes")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def trace(card: ModelCard, plan: Plan, steps: int = 2, timeline_points: int = 2000, fake: bool = True,
          impl: str = "auto", *, seq_lens: tuple[int, ...] | None = None, record_events: bool = False) -> Trace:
    """Count the live tensor bytes of `steps` training steps; report the last.

    impl: who builds LoRA/QLoRA/DoRA — "peft" (its get_peft_model, what users run), "ours", or "auto" (peft
    when installed; `peftplan.measure.step.resolve_impl`).

    fake=False runs the same step on real CPU tensors (small models only): the check that fake tensors
    count what real ones hold. seq_lens: one sequence length per step (then steps = len(seq_lens)); each
    step gets a new batch of that length, made while the previous one is still referenced, as a data
    loader hands them over. record_events keeps every allocation and free (`Trace.events`) for the
    caching-allocator replay.
    """
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from peftplan.measure.step import build_model, make_batch, make_optimizer, resolve_impl, train_step
    from peftplan.trace.counter import LiveBytes, module_hooks
    from peftplan.trace.moe import forced_routing

    if seq_lens is not None:
        if not seq_lens or min(seq_lens) < 1:
            raise PlanError(f"sequence lengths must be at least 1, got {list(seq_lens)}")
        steps, plan = len(seq_lens), replace(plan, seq_len=seq_lens[-1])  # the reported step's shape
    if steps < 1:
        raise PlanError(f"steps must be at least 1, got {steps}")
    t0 = time.perf_counter()
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else nullcontext()
    counter = LiveBytes(vocab_size=card.vocab_size, record_events=record_events)
    from peftplan.planning.layout import layout

    head = layout(card).head
    mesh = None
    if plan.strategy in ("fsdp", "fsdp-grad-op", "fsdp-hybrid"):
        from peftplan.trace.distributed import fake_world

        mesh = fake_world(plan)
    try:
        with mode, quiet_torch_logs():
            model, _ = build_model(card, plan, "cpu", impl=impl)
            if mesh is not None:
                from peftplan.trace.distributed import shard

                shard(model, plan, mesh, _blocks(model, card))
            batch = make_batch(card, replace(plan, seq_len=seq_lens[0]) if seq_lens else plan, "cpu")
            optimizer = make_optimizer(model, plan)
    except PlanError:
        raise
    except ImportError as e:  # --impl peft (or QLoRA's bitsandbytes) without the package
        raise TraceError(f"building {card.name} for the trace needs {e.name or 'a missing package'}, which is not "
                         "installed: pip install -e '.[torch,quant]' (README: CPU torch pinned first)") from None
    except Exception as e:  # transformers refuses the config, or a shape past int64: one line, not a traceback
        msg = str(e).strip().splitlines()[-1].strip() if str(e).strip() else type(e).__name__
        raise TraceError(f"cannot build {card.name} for the trace: {type(e).__name__}: {msg[:300]}") from None
    handles = module_hooks(model, counter, head)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        handles.append(p.register_post_accumulate_grad_hook(lambda q: counter.reclassify(q.grad, "gradients")))

    def classify_static() -> None:
        for t in model.buffers():
            counter.reclassify(t, "frozen_weights")
        for p in model.parameters():
            counter.reclassify(p, "trainable_weights" if p.requires_grad else "frozen_weights")
            qs = getattr(p, "quant_state", None)
            if qs is not None:
                for t in _quant_state_tensors(qs):
                    counter.reclassify(t, "frozen_weights")
        for state in optimizer.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    counter.reclassify(v, "optimizer_states")
        for v in batch.values():
            counter.reclassify(v, "activations")

    timeline: list = []
    resizes = nullcontext()
    if mesh is not None:
        from peftplan.trace.distributed import storage_resizes

        resizes = storage_resizes(counter)
    try:
        with cuda_like(), resizes, forced_routing(model, plan.moe_routing), mode, counter, quiet_torch_logs():
            for step in range(steps):
                counter.step, counter.phase, counter.op = step, "setup", "(batch)"
                if seq_lens is not None and step > 0:
                    batch = make_batch(card, replace(plan, seq_len=seq_lens[step]), "cpu")
                classify_static()
                counter.peaks.clear()
                if counter.timeline is not None:
                    counter.timeline.clear()
                train_step(model, batch, optimizer, plan, on_phase=_on_phase(counter))
        timeline = list(counter.timeline or [])
    except PlanError:
        raise
    except Exception as e:  # an op fake tensors cannot run: say which, where
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TraceError(f"trace failed in {counter.phase} at module '{counter.module or '-'}' "
                         f"(op #{counter.ops}): {type(e).__name__}: {msg[:300]}") from None
    finally:
        for h in handles:
            h.remove()
    phases = tuple(
        TracePhase(p.phase, p.peak_bytes, p.start_bytes, {k: v for k, v in p.by_category_bytes.items()},
                   p.op, p.module, p.op_index)
        for name in PHASES if (p := counter.peaks.get(name)) is not None
    )
    return Trace(model=card.name, plan=plan, steps=steps, phases=phases,
                 timeline=_decimate(timeline, timeline_points), ops=counter.ops,
                 seconds=time.perf_counter() - t0, impl=resolve_impl(plan, impl), events=tuple(counter.events or ()),
                 seq_lens=tuple(seq_lens or ()))


def _blocks(model, card: ModelCard) -> list:
    """The decoder blocks (the repeated layer list named by the card's layout)."""
    from peftplan.planning.layout import layout

    prefix = layout(card).block_prefix
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft's PeftModel wraps it
    return [base.get_submodule(f"{prefix}.{i}") for i in range(card.n_layers)]


def _on_phase(counter):
    def on_phase(name: str) -> None:
        if name in PHASES:
            counter.set_phase(name)
        else:
            counter.phase = name
    return on_phase


def _quant_state_tensors(qs) -> list:
    import torch

    out = []
    for name in ("absmax", "code", "offset"):
        v = getattr(qs, name, None)
        if isinstance(v, torch.Tensor):
            out.append(v)
    nested = getattr(qs, "state2", None)
    if nested is not None:
        out += _quant_state_tensors(nested)
    return out
