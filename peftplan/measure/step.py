"""The one training step: the CPU tracer (under FakeTensorMode) and the GPU profiler both run exactly this.

    build_model     transformers model from the card on meta (no download, no memory), `inject` the plan,
                    then `materialize`: every parameter and buffer made with torch.empty on the device and
                    initialised in place (so under a FakeTensorMode every tensor is fake and costs nothing)
    make_batch      b×s random token ids (fixed seed) and labels; no attention mask, so SDPA runs is_causal
    make_optimizer  the plan's optimizer over the trainable parameters
    train_step      forward (loss) → backward → optimizer.step() → zero_grad(set_to_none=True),
                    announcing each phase to `on_phase` so peaks can be attributed
    run_steps       N steps on a device, with losses, step times and the counted model
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

from peftplan.build import hf_config
from peftplan.planning.cards import ENCODERS, ModelCard
from peftplan.errors import PlanError
from peftplan.inject import TORCH_DTYPES, Injection, inject, is_norm
from peftplan.layers import Adapter, LoRALinear, is_linear, is_linear4bit
from peftplan.layers.lora import attach_nf4
from peftplan.measure.autocast import recompute_autocast, trainer_autocast
from peftplan.measure.count import ModelCount, count_model
from peftplan.measure.scaler import scaler_for
from peftplan.plan import Plan

INIT_STD = 0.02  # N(0, 0.02²) for Linear/Embedding weights, transformers' initializer_range default
BATCH_SEED = 1234
MLM_EVERY = 7  # masked-LM labels on every 7th position (≈14%, BERT masks 15%); shapes stay static
LR = {"adamw": 1e-4, "adamw8bit": 1e-4, "paged-adamw": 1e-4, "paged-adamw8bit": 1e-4, "sgd": 1e-2,
      "sgd-momentum": 1e-2}
PHASES = ("forward", "backward", "optimizer", "end")

OnPhase = Callable[[str], None]


# ---------------------------------------------------------------- model


def step_config(card: ModelCard, plan: Plan):
    """The card's transformers config (`build.hf_config`) with use_cache off and the plan's attention."""
    config = hf_config(card)
    config.use_cache = False
    config._attn_implementation = plan.attention
    return config


def hf_attention(plan: Plan, device="cpu") -> str:
    """transformers' attn_implementation for the plan. `flash` is flash_attention_2 where the flash-attn
    package and a CUDA device exist; elsewhere SDPA, whose flash kernel saves the same tensors (q, k, v,
    the output and a fp32 log-sum-exp per head and token, no s² matrix)."""
    if plan.attention != "flash":
        return plan.attention
    import importlib.util

    cuda = torch.device(device).type == "cuda"
    return "flash_attention_2" if cuda and importlib.util.find_spec("flash_attn") else "sdpa"


def resolve_impl(plan: Plan, impl: str = "auto") -> str:
    """Who builds the LoRA layers: "peft" (its own get_peft_model), "ours" (peftplan.layers), or "auto":
    peft for LoRA/QLoRA when it is installed (DoRA needs it)."""
    if impl not in ("auto", "peft", "ours"):
        raise PlanError(f"unknown impl '{impl}' (choose from auto, peft, ours)")
    from peftplan.inject import peft_available

    if impl == "auto":
        impl = "peft" if plan.uses_lora and peft_available() else "ours"
    if impl == "peft" and not plan.uses_lora:
        impl = "ours"  # peft has no full fine-tuning, top-k or Houlsby adapter
    if plan.use_dora and impl != "peft":
        raise PlanError("DoRA is built by peft (impl=peft): pip install peft")
    return impl


def model_class(card: ModelCard):
    """The transformers class for the card's task: a generated card's own (`card.model_class`, e.g.
    T5ForConditionalGeneration, DebertaV2ForMaskedLM, Qwen3ForCausalLM), else the causal-LM or masked-LM
    Auto class."""
    import transformers

    if card.generated:
        return getattr(transformers, card.model_class)
    return transformers.AutoModelForMaskedLM if card.encoder else transformers.AutoModelForCausalLM


def build_model(card: ModelCard, plan: Plan, device="cpu", *, seed: int = 0,
                impl: str = "ours") -> tuple[nn.Module, Injection]:
    """The card's model with the plan injected, random weights on `device`, in training mode.

    impl: "ours" (peftplan's layers), "peft" (peft's get_peft_model) or "auto" (`resolve_impl`).
    Safe inside a FakeTensorMode: the meta skeleton is built outside it, the tensors are made under it.
    """
    with unset_fake_temporarily():
        config = step_config(card, plan)
        auto = model_class(card)
        try:
            with torch.device("meta"):
                build = getattr(auto, "from_config", None) or auto._from_config  # a model class: _from_config
                model = build(config, dtype=TORCH_DTYPES[plan.dtype], attn_implementation=hf_attention(plan, device))
        except ValueError as e:  # e.g. gemma2 has no SDPA path in transformers 5
            first = str(e).strip().split(". ")[0]
            raise PlanError(f"{card.name}: attention '{plan.attention}' is not available ({first})") from None
        if plan.logits_shift_copy and not card.encoder:  # transformers <= 4.48's loss (measure/loss.py)
            from peftplan.measure.loss import shifted_causal_lm_loss

            model.loss_function = shifted_causal_lm_loss
        if resolve_impl(plan, impl) == "peft":
            from peftplan.inject import inject_peft

            model, injection = inject_peft(model, card, plan)
        else:
            injection = inject(model, card, plan)
    materialize(model, device, plan, seed=seed)
    model.train()
    if plan.grad_checkpointing:
        recompute = recompute_autocast(plan.autocast, device)
        if recompute is not None and plan.use_reentrant:
            raise PlanError("reentrant checkpointing under autocast runs only on CUDA (the CPU emulation of CUDA's "
                            "autocast cannot enter its recomputation): use --no-use-reentrant to trace it")
        enable_checkpointing(model, plan.use_reentrant, recompute)
    return model, injection


def enable_checkpointing(model: nn.Module, use_reentrant: bool = False, recompute=None) -> None:
    """Checkpoint every block, as `model.gradient_checkpointing_enable({"use_reentrant": ...})` does; transformers
    5 then also calls `enable_input_require_grads` (the embedding output requires grad, which reentrant
    checkpointing needs when the embeddings are frozen).

    transformers 5.24 renamed gradient_checkpointing_enable to activation_checkpointing_enable; older 5.x
    (the GPU machine's 5.17) has only the former. `recompute`: a context factory entered around each block's
    recomputation (the CPU autocast emulation, which torch's checkpoint cannot restore by itself).
    """
    kwargs: dict = {"use_reentrant": use_reentrant}
    if recompute is not None:  # non-reentrant checkpoint's context_fn: (forward context, recompute context)
        kwargs["context_fn"] = lambda: (contextlib.nullcontext(), recompute())
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _adapter_owned(model: nn.Module) -> set[int]:
    """ids of the modules holding LoRA/adapter parameters (initialised by their own rules)."""
    owned: set[int] = set()
    for m in model.modules():
        if isinstance(m, LoRALinear):
            owned |= {id(x) for x in (*m.lora_a.modules(), *m.lora_b.modules())}
        elif isinstance(m, Adapter):
            owned |= {id(x) for x in m.modules()}
    return owned


def _make_direct(module: nn.Module, device, memo: dict[int, tuple]) -> bool:
    """Replace the module's own meta parameters and buffers by torch.empty on device; ties stay ties."""
    made = False
    for store in (module._parameters, module._buffers):
        for name, t in list(store.items()):
            if t is None or t.device.type != "meta" or (store is module._parameters and is_linear4bit(module)
                                                         and name == "weight"):
                continue
            if id(t) not in memo:
                new = torch.empty(t.shape, dtype=t.dtype, device=device)
                if store is module._parameters:
                    new = nn.Parameter(new, requires_grad=t.requires_grad)
                memo[id(t)] = (t, new)  # keep t alive so its id is not reused
            store[name] = memo[id(t)][1]
            made = True
    return made


def _init_base(model: nn.Module, module: nn.Module, device, g: torch.Generator) -> None:
    """Random weights N(0, 0.02²), zero biases, unit norms; buffers as transformers computes them."""
    if any(b is not None for b in module._buffers.values()):
        model._init_weights(module)  # rotary inv_freq, position ids, embed scale: transformers knows each
    if is_linear4bit(module):
        if module.weight.device.type == "meta":
            w = torch.empty(module.weight.shape, dtype=module.weight.dtype, device=device)
            attach_nf4(module, w.normal_(0.0, INIT_STD, generator=g))
    elif is_linear(module) or isinstance(module, nn.Embedding):
        module.weight.normal_(0.0, INIT_STD, generator=g)
    elif is_norm(module):
        if getattr(module, "weight", None) is not None:
            module.weight.fill_(1.0)
    else:
        for name, p in module.named_parameters(recurse=False):
            p.zero_() if name.endswith("bias") else p.normal_(0.0, INIT_STD, generator=g)
    if isinstance(getattr(module, "bias", None), torch.Tensor):
        module.bias.zero_()


@torch.no_grad()
def materialize(model: nn.Module, device, plan: Plan, *, seed: int = 0) -> nn.Module:
    """Make every meta tensor of `model` real on `device` (or fake, under a FakeTensorMode), initialised.

    Only torch.empty and in-place init ops: no .to() of meta tensors, no .item()/.tolist(). Base modules come
    first in module order from one generator, LoRA/adapter parameters after from another, so the base weights
    of a seed do not depend on the method. 4-bit layers are quantized one at a time (`attach_nf4`), so the
    float copy of only one weight exists at once. Dtypes and requires_grad are those `inject` set from the plan,
    which is taken here for the shared signature only.
    """
    device = torch.device(device)
    owned = _adapter_owned(model)
    memo: dict[int, tuple] = {}
    g_base = torch.Generator(device=device).manual_seed(seed)
    g_adapt = torch.Generator(device=device).manual_seed(seed + 1)
    for m in model.modules():
        if id(m) not in owned and not isinstance(m, (LoRALinear, Adapter)):
            if _make_direct(m, device, memo) or (is_linear4bit(m) and m.weight.device.type == "meta"):
                _init_base(model, m, device, g_base)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            _make_direct(m.lora_a, device, memo)
            _make_direct(m.lora_b, device, memo)
            m.reset_lora_parameters(generator=g_adapt)
        elif isinstance(m, Adapter):
            for sub in m.modules():
                _make_direct(sub, device, memo)
            m.reset_parameters(generator=g_adapt)
    return model


# ---------------------------------------------------------------- batch and optimizer


def make_batch(card: ModelCard, plan: Plan, device) -> dict[str, torch.Tensor]:
    """input_ids b×s drawn with a fixed seed (on the CPU, so every device gets the same batch) and labels.

    Causal LMs: labels = a copy of input_ids (the model shifts them). Seq2seq (T5): the same copy as the
    b×s target; the model makes its decoder inputs by shifting the labels right (`_shift_right`). Encoders:
    masked-LM labels on every MLM_EVERY-th position, -100 elsewhere; classification: one class per row.
    No attention_mask: SDPA takes its is_causal path.
    """
    b, s = plan.batch_size, plan.seq_len
    if card.positions == "learned" and s > card.max_positions:
        raise PlanError(f"sequence length {s} exceeds the {card.max_positions} positions of {card.name}")
    g = torch.Generator(device="cpu").manual_seed(BATCH_SEED)
    ids = torch.randint(0, card.vocab_size, (b, s), generator=g, device="cpu").to(device)
    if card.task == "classification":
        n = int(card.config.get("num_labels") or len(card.config.get("id2label") or {}) or 2)
        labels = torch.randint(0, n, (b,), generator=g, device="cpu").to(device)
    elif card.encoder:
        keep = (torch.arange(s, device=device) % MLM_EVERY == 0).expand(b, s)
        labels = torch.where(keep, ids, torch.full_like(ids, -100))
    else:
        labels = ids.clone()
    return {"input_ids": ids, "labels": labels}


def _fake_mode(params: list[torch.Tensor]):
    return params[0].fake_mode if params and isinstance(params[0], FakeTensor) else None


def make_optimizer(model: nn.Module, plan: Plan) -> torch.optim.Optimizer:
    """The plan's optimizer over the trainable parameters; lr 1e-4 (Adam family) or 1e-2 (SGD).

    adamw: torch AdamW, foreach=plan.foreach, fused=False. adamw8bit / paged-adamw / paged-adamw8bit:
    bitsandbytes (8-bit states for tensors of ≥ 4096 elements, fp32 below; paged falls back to plain on CPU).
    sgd: momentum 0; sgd-momentum: 0.9.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise PlanError("the model has no trainable parameters")
    lr, name = LR[plan.optimizer], plan.optimizer
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, foreach=plan.foreach, fused=False)
    if name in ("sgd", "sgd-momentum"):
        return torch.optim.SGD(params, lr=lr, momentum=0.9 if name == "sgd-momentum" else 0.0, foreach=plan.foreach)
    import bitsandbytes as bnb

    cls = {"adamw8bit": bnb.optim.AdamW8bit, "paged-adamw": bnb.optim.PagedAdamW,
           "paged-adamw8bit": bnb.optim.PagedAdamW8bit}[name]
    with unset_fake_temporarily():  # its 8-bit code books are built with .tolist()
        opt = cls(params, lr=lr)
    mode = _fake_mode(params)
    if mode is not None:
        opt.name2qmap = {k: mode.from_tensor(v) for k, v in opt.name2qmap.items()}
    return opt


# ---------------------------------------------------------------- the step


def train_step(model: nn.Module, batch: dict, optimizer: torch.optim.Optimizer, plan: Plan,
               on_phase: OnPhase | None = None) -> torch.Tensor:
    """(forward → backward) × plan.grad_accum → clip_grad_norm_ (max_grad_norm > 0) → optimizer.step() →
    zero_grad(set_to_none=True), as the HF Trainer's inner loop; returns the detached loss of the last micro-step.
    fp16 autocast: scaler.scale(loss).backward(), unscale_, clip, scaler.step, scaler.update (measure/scaler.py).

    `on_phase(name)` is called with "forward", "backward", "optimizer" before each phase and "end" after.
    """
    phase = on_phase or (lambda name: None)
    cfg = model.config
    kwargs = {"use_cache": False} if cfg.model_type not in ENCODERS and hasattr(cfg, "use_cache") else {}
    scaler = scaler_for(optimizer, plan, batch["input_ids"].device)  # fp16 autocast: the GradScaler
    for _ in range(plan.grad_accum):  # the Trainer's gradient accumulation: grads add up over micro-steps
        phase("forward")
        with trainer_autocast(plan.autocast, batch["input_ids"].device):  # the Trainer's compute_loss region
            loss = model(**batch, **kwargs).loss
        if plan.grad_accum > 1:
            loss = loss / plan.grad_accum
        phase("backward")
        (scaler.scale(loss) if scaler else loss).backward()
        # the Trainer's training_step returns loss.detach(): the graph dies here, with what its nodes still hold
        # (checkpointing's enable_input_require_grads makes the embedding output a leaf that gets a .grad)
        loss = loss.detach()
    phase("optimizer")
    if scaler:
        scaler.unscale_(optimizer)  # accelerate unscales before clipping, and step() then skips it
    if plan.max_grad_norm > 0:  # the Trainer clips before every optimizer step (max_grad_norm, default 1.0)
        params = [p for p in model.parameters() if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, plan.max_grad_norm, foreach=plan.foreach)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    phase("end")
    return loss.detach()


@dataclass(frozen=True)
class StepRun:
    model: str
    plan: Plan
    device: str
    losses: tuple[float, ...]  # per step (nan under fake tensors)
    step_seconds: tuple[float, ...]  # wall time per step, device synchronised
    tokens_per_s: float  # b·s / median step time, the first (warm-up) step left out when there are more
    count: ModelCount
    injection: Injection
    peak_allocated_bytes: int  # torch.cuda.max_memory_allocated over the steps; 0 off CUDA


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(card: ModelCard, plan: Plan, device, steps: int, on_phase: OnPhase | None = None, *,
              seed: int = 0) -> StepRun:
    """Build, then run `steps` training steps on one fixed batch; what happened, typed."""
    if steps < 1:
        raise PlanError(f"steps must be at least 1, got {steps}")
    device = torch.device(device)
    model, injection = build_model(card, plan, device, seed=seed)
    counted = count_model(model)
    batch = make_batch(card, plan, device)
    optimizer = make_optimizer(model, plan)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, seconds = [], []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        loss = train_step(model, batch, optimizer, plan, on_phase)
        _sync(device)
        seconds.append(time.perf_counter() - t0)
        losses.append(float("nan") if isinstance(loss, FakeTensor) else float(loss))
    timed = seconds[1:] if len(seconds) > 1 else seconds
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return StepRun(model=card.name, plan=plan, device=str(device), losses=tuple(losses),
                   step_seconds=tuple(seconds), tokens_per_s=plan.tokens / statistics.median(timed),
                   count=counted, injection=injection, peak_allocated_bytes=peak)
