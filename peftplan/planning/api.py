"""`estimate()`: parameters, per-phase peak memory and time/cost for one plan. No torch import."""
from __future__ import annotations

from peftplan.errors import PlanError
from peftplan.planning import dora, families, moe
from peftplan.planning.cards import ModelCard, load_card
from peftplan.planning.memory import phases
from peftplan.planning.params import count, lora_targets
from peftplan.plan import Plan
from peftplan.results import Estimate
from peftplan.planning.timing import stack_of, step_time
from peftplan.planning.validate import check_tokens


def estimate(model: str | ModelCard, plan: Plan | None = None, gpu: str | None = None, tokens: int | float = 0,
             **plan_fields) -> Estimate:
    """Plan a fine-tuning run: `estimate("opt-6.7b", method="qlora", r=16, gpu="a100-40gb")`.

    `tokens`: tokens of data for GPU-hours and cost, a whole number in [0, 10^18] (1e8 is fine).
    Raises PlanError (one line) for bad input: PlanValueError for a plan field or `tokens`, ConfigError for a
    bad config.json or card, InputFileError for an unreadable path (planning/validate.py).
    """
    tokens = check_tokens(tokens)
    card = model if isinstance(model, ModelCard) else load_card(model)
    plan = plan.with_(**plan_fields) if plan is not None and plan_fields else (plan or Plan(**plan_fields))
    moe.refuse(card, plan)
    p = dora.with_magnitudes(card, plan, count(card, plan))
    mem = phases(card, plan)
    warnings = moe.warnings(card, plan) + families.warnings(card, plan)
    if plan.ignored_options():  # e.g. --r with --method full: say so rather than plan silently without it
        ckpt = any("reentrant" in o for o in plan.ignored_options())
        what = f"--method {plan.method}" + (", no --grad-checkpointing" if ckpt else "")
        warnings.append(f"options this plan does not use ({what}): {', '.join(plan.ignored_options())}")
    strategy, cpu = "none", 0
    if plan.gpus > 1 or plan.strategy != "none" or plan.offload != "none":
        from peftplan.planning.distributed import check, shard_phases

        warnings += check(plan)
        mem, sharding = shard_phases(card, plan, p, mem)
        strategy, cpu = sharding.strategy, sharding.cpu_offload_bytes
    if plan.seq_len > card.max_positions:
        kind = "learned positions: the real model cannot run it" if card.positions == "learned" else "positions"
        warnings.append(f"sequence length {plan.seq_len} exceeds {card.name}'s {card.max_positions} {kind}")
    if plan.uses_lora:
        small = [lin.name for lin, _, _ in lora_targets(card, plan.targets)
                 if lin.role == "router" and plan.r > min(lin.d_in, lin.d_out)]
        if small:  # a router's side is the number of experts; peft wraps it anyway
            warnings.append(f"LoRA rank r = {plan.r} exceeds the smaller side of {', '.join(small[:3])} "
                            "(peft allows it; those updates have lower rank than r)")
    if card.task == "image-text-to-text":
        warnings.append(f"planning the whole {card.model_class} (vision tower included, frozen unless targeted); "
                        "--text-only plans the text model alone")
    elif card.text_only:
        warnings.append(f"planning the text model alone ({card.model_class})")
    if families.eager_only(card) and plan.attention != "eager":
        warnings.append(f"transformers runs {card.model_class or card.model_type} with eager attention only (its "
                        f"{plan.attention} path is refused): pass --attention eager")
    if plan.method == "qlora" and plan.kbit_prep and not plan.grad_checkpointing:
        warnings.append("peft's prepare_model_for_kbit_training turns gradient checkpointing on by default "
                        "(use_gradient_checkpointing=True); this plan has it off (--grad-checkpointing to match)")
    if plan.grad_accum > 1:
        warnings.append(f"forward and backward are micro-step 2..{plan.grad_accum} of {plan.grad_accum}: the "
                        "gradients of the earlier micro-steps are held through them")
    time = gpu_memory = None
    gpu_name = None
    if gpu is not None:
        from peftplan.planning.gpus import load_gpu, peak_tflops

        g = load_gpu(gpu)
        if plan.attention == "flash" and g.bf16_tflops <= 0:  # FlashAttention-2 needs Ampere (sm80) or newer,
            # the generation that brought bf16 tensor cores (the card records none for T4 and V100)
            warnings.append(f"{g.full_name} predates Ampere: FlashAttention-2 does not run there (use --attention "
                            "sdpa)")
        gpu_name, gpu_memory = g.name, g.usable_memory_bytes
        if plan.autocast != "none" and getattr(g, f"{plan.autocast}_tflops") <= 0:
            raise PlanError(f"{g.full_name} has no {plan.autocast} support: the Trainer refuses "
                            f"{plan.autocast}=True on it "
                            f"(use --autocast {'fp16' if plan.autocast == 'bf16' else 'none'})")
        if plan.dtype == "bf16" and g.bf16_tflops <= 0:
            warnings.append(f"{g.full_name} has no bf16 tensor cores: bf16 runs emulated, time at its fp32 rate "
                            "(use --dtype fp16)")
            rate = peak_tflops(g, "fp32")
        else:
            rate = peak_tflops(g, plan.compute_dtype)
        time = step_time(card, plan, g, tokens, stack=stack_of(plan), peak_tflops=rate)
    return Estimate(model=card.name, plan=plan, params=p, phases=mem, gpu=gpu_name, gpu_memory_bytes=gpu_memory,
                    time=time, warnings=tuple(warnings), strategy=strategy, cpu_offload_bytes=cpu,
                    moe=moe.routing(card, plan))
