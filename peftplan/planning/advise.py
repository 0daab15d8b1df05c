"""`advise`: the fastest way to run a target global batch on one GPU card, with memory to spare.

For a model, a method and a card, search micro-batch b × gradient accumulation N × checkpointing × optimizer ×
attention. A configuration is kept when its predicted device peak (the estimate's NVML view) is at most
(1 − headroom) of the card's usable memory; for each (checkpointing, optimizer, attention) the micro-batch is the
largest that fits (`fit.search_largest`), capped by the global batch, and N = ⌈G / b⌉, so b·N ≥ G sequences per
optimizer step (equal to G when b divides G; said otherwise). Candidates are ranked by predicted tokens/s, then by
fewer accumulation steps. Pure Python: the estimate only.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from peftplan.errors import PlanError
from peftplan.plan import Plan
from peftplan.planning.api import estimate
from peftplan.planning.cards import ModelCard, load_card
from peftplan.planning.fit import search_largest
from peftplan.planning.gpus import load_gpu

DEFAULT_OPTIMIZERS = ("adamw", "adamw8bit", "paged-adamw8bit")
DEFAULT_ATTENTIONS = ("flash", "sdpa")
# Trainer `optim` spelling of each peftplan optimizer (sources.trainer.OPTIM, inverted)
TRAINER_OPTIM = {"adamw": "adamw_torch", "adamw8bit": "adamw_bnb_8bit", "paged-adamw": "paged_adamw_32bit",
                 "paged-adamw8bit": "paged_adamw_8bit", "sgd": "sgd"}
ATTN_IMPLEMENTATION = {"flash": "flash_attention_2", "sdpa": "sdpa", "eager": "eager"}


@dataclass(frozen=True)
class Candidate:
    plan: Plan  # the micro-step plan (batch_size = micro-batch b, grad_accum = N)
    micro_batch: int
    grad_accum: int
    sequences_per_step: int  # b·N, ≥ the target
    peak_bytes: int  # predicted device peak (NVML view)
    limit_bytes: int  # (1 − headroom) · usable memory
    tokens_per_s: float
    step_time_s: float  # one optimizer step: N micro-steps

    @property
    def headroom_fraction(self) -> float:
        return 1 - self.peak_bytes / self.limit_bytes


@dataclass(frozen=True)
class Advice:
    model: str
    method: str
    gpu: str
    global_batch: int  # target sequences per optimizer step
    seq_len: int
    headroom: float
    usable_bytes: int
    candidates: tuple[Candidate, ...]  # fitting configurations, best first
    skipped: tuple[str, ...]  # combinations that were not searched, with the reason

    @property
    def best(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["best"] = asdict(self.best) if self.best else None
        return d


def _flash_supported(gpu) -> bool:
    # FlashAttention-2 needs Ampere or newer (sm80+): the generation that brought bf16 tensor cores, which the
    # GPU cards record as bf16_tflops > 0 (T4 and V100 have none).
    return gpu.bf16_tflops > 0


def advise(model: str | ModelCard, base: Plan, gpu: str, global_batch: int, headroom: float = 0.10,
           optimizers: Sequence[str] = DEFAULT_OPTIMIZERS, attentions: Sequence[str] = DEFAULT_ATTENTIONS,
           checkpointing: Sequence[bool] = (False, True)) -> Advice:
    """Every fitting (b, N, checkpointing, optimizer, attention) for `global_batch` sequences of `base.seq_len`.

    Raises PlanError for a non-positive global batch, headroom outside [0, 0.9], or unknown names.
    """
    if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch < 1:
        raise PlanError(f"global batch must be a positive number of sequences, got {global_batch}")
    if not (isinstance(headroom, int | float) and 0 <= headroom <= 0.9):
        raise PlanError(f"headroom must be a fraction in [0, 0.9], got {headroom}")
    if not optimizers or not attentions or not checkpointing:
        raise PlanError("advise needs at least one optimizer, attention and checkpointing choice")
    card = model if isinstance(model, ModelCard) else load_card(model)
    g = load_gpu(gpu)
    limit = int((1 - headroom) * g.usable_memory_bytes)
    cands: list[Candidate] = []
    skipped: list[str] = []
    for attn in dict.fromkeys(attentions):
        if attn == "flash" and not _flash_supported(g):
            skipped.append(f"flash attention: {g.full_name} predates Ampere (FlashAttention-2 needs sm80+)")
            continue
        for opt in dict.fromkeys(optimizers):
            for ckpt in dict.fromkeys(checkpointing):
                plan = base.with_(attention=attn, optimizer=opt, grad_checkpointing=ckpt, batch_size=1)
                peaks: dict[int, int] = {}

                def peak(b: int, plan=plan, peaks=peaks) -> int:
                    if b not in peaks:
                        peaks[b] = estimate(card, plan.with_(batch_size=b, grad_accum=math.ceil(global_batch / b))
                                            ).peak_bytes
                    return peaks[b]

                b = search_largest(lambda n: peak(n) <= limit, global_batch)
                if b == 0:
                    continue
                n = math.ceil(global_batch / b)
                chosen = plan.with_(batch_size=b, grad_accum=n)
                est = estimate(card, chosen, gpu=g.name)
                step = est.time.step_time_s * n
                cands.append(Candidate(plan=chosen, micro_batch=b, grad_accum=n, sequences_per_step=b * n,
                                       peak_bytes=est.peak_bytes, limit_bytes=limit,
                                       tokens_per_s=b * n * base.seq_len / step if step else 0.0, step_time_s=step))
    cands.sort(key=lambda c: (-round(c.tokens_per_s, 6), c.grad_accum, c.plan.grad_checkpointing, c.peak_bytes))
    return Advice(model=card.name, method=base.method, gpu=g.name, global_batch=global_batch, seq_len=base.seq_len,
                  headroom=headroom, usable_bytes=g.usable_memory_bytes, candidates=tuple(cands),
                  skipped=tuple(skipped))


def training_arguments(c: Candidate) -> str:
    """The candidate as ready-to-paste transformers TrainingArguments (and the model's attn_implementation)."""
    p = c.plan
    lines = [f"per_device_train_batch_size={c.micro_batch},", f"gradient_accumulation_steps={c.grad_accum},"]
    if p.grad_checkpointing:
        lines += ["gradient_checkpointing=True,", 'gradient_checkpointing_kwargs={"use_reentrant": False},']
    lines.append(f'optim="{TRAINER_OPTIM.get(p.optimizer, p.optimizer)}",')
    autocast = getattr(p, "autocast", "none")
    if autocast in ("bf16", "fp16"):
        lines.append(f"{autocast}=True,")
    args = "TrainingArguments(\n    " + "\n    ".join(lines) + "\n)"
    return args + f'\n# model: from_pretrained(..., attn_implementation="{ATTN_IMPLEMENTATION[p.attention]}")'


def axolotl_keys(c: Candidate) -> str:
    """The candidate as axolotl YAML keys."""
    p = c.plan
    keys = {"micro_batch_size": c.micro_batch, "gradient_accumulation_steps": c.grad_accum,
            "sequence_len": p.seq_len, "gradient_checkpointing": str(p.grad_checkpointing).lower(),
            "optimizer": TRAINER_OPTIM.get(p.optimizer, p.optimizer),
            {"flash": "flash_attention", "sdpa": "sdp_attention", "eager": "eager_attention"}[p.attention]: "true"}
    if p.method in ("lora", "qlora"):
        keys = {"adapter": p.method, "lora_r": p.r, "lora_alpha": int(p.alpha) if float(p.alpha).is_integer()
                else p.alpha, **keys}
        if p.method == "qlora":
            keys["load_in_4bit"] = "true"
    return "\n".join(f"{k}: {v}" for k, v in keys.items())
