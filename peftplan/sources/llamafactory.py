"""A LLaMA-Factory training YAML as Plan fields.

Defaults and rules as LLaMA-Factory's hparams (src/llamafactory/hparams/model_args.py, finetuning_args.py,
data_args.py) state them: `finetuning_type` lora (default) | full | freeze; `lora_rank` 8, `lora_alpha` defaults
to 2·lora_rank, `lora_target` "all" = every linear layer; `freeze_trainable_layers` 2 (the last n blocks);
`quantization_bit` 4 with `double_quantization` true (bitsandbytes NF4); `cutoff_len` 2048;
`disable_gradient_checkpointing` false — checkpointing is ON unless disabled — with `use_reentrant_gc` true;
`flash_attn` auto | fa2 | sdpa | disabled; `pure_bf16` false: trainable parameters are cast to fp32 (so full
fine-tuning is fp32 master weights under bf16 autocast, and LoRA adapters are fp32); the Trainer's
`per_device_train_batch_size`, `gradient_accumulation_steps`, `bf16`/`fp16`, `optim`, `max_grad_norm`.
LLaMA-Factory does not call peft's `prepare_model_for_kbit_training`: norms stay in the load dtype unless
`upcast_layernorm`.
"""
from __future__ import annotations

from pathlib import Path

from peftplan.errors import PlanError
from peftplan.sources.common import Fields, Source, memory_warnings, unknown_keys
from peftplan.sources.trainer import OPTIM, trainer_defaults

UNMODELLED = {
    "deepspeed": "DeepSpeed ZeRO sharding",
    "use_galore": "GaLore projected optimizer",
    "use_apollo": "APOLLO projected optimizer",
    "use_badam": "BAdam block-wise optimizer",
    "enable_liger_kernel": "Liger fused kernels (no logits kept)",
    "use_unsloth": "Unsloth kernels",
    "use_unsloth_gc": "Unsloth offloaded checkpointing",
    "upcast_layernorm": "fp32 layer norms",
    "upcast_lmhead_output": "fp32 lm_head output",
    "additional_target": "trainable full copies of extra modules",
    "shift_attn": "shifted sparse attention",
    "mixture_of_depths": "mixture of depths",
    "use_llama_pro": "LLaMA Pro block expansion",
    "freeze_extra_modules": "extra trainable modules",
}

KNOWN = set(UNMODELLED) | {
    "model_name_or_path", "stage", "do_train", "finetuning_type", "lora_rank", "lora_alpha", "lora_dropout",
    "lora_target", "use_dora", "use_rslora", "quantization_bit", "quantization_method", "quantization_type",
    "double_quantization", "cutoff_len", "per_device_train_batch_size", "gradient_accumulation_steps", "bf16",
    "fp16", "pure_bf16", "flash_attn", "optim", "max_grad_norm", "disable_gradient_checkpointing",
    "use_reentrant_gc", "packing", "neat_packing", "freeze_trainable_layers", "freeze_trainable_modules",
    "dataset", "dataset_dir", "template", "max_samples", "overwrite_cache", "preprocessing_num_workers",
    "output_dir", "logging_steps", "save_steps", "plot_loss", "overwrite_output_dir", "learning_rate",
    "num_train_epochs", "lr_scheduler_type", "warmup_ratio", "warmup_steps", "ddp_timeout", "val_size",
    "per_device_eval_batch_size", "eval_strategy", "eval_steps", "report_to", "trust_remote_code",
    "resume_from_checkpoint", "save_only_model", "dataloader_num_workers", "run_name", "eval_dataset",
    "include_num_input_tokens_seen", "weight_decay", "max_steps", "save_total_limit", "seed", "rope_scaling",
}

ATTENTION = {"fa2": "flash", "sdpa": "sdpa", "disabled": "eager", "auto": "sdpa"}


def looks_like(data: dict) -> bool:
    return "finetuning_type" in data or "model_name_or_path" in data and ("stage" in data or "template" in data)


def read_llamafactory(data: dict, path: Path) -> Source:
    f = Fields(data, path)
    out: dict = {}
    unsupported: dict = {}
    warnings = list(memory_warnings(data, UNMODELLED, path))
    stage = f.str("stage") or "sft"
    if stage not in ("sft", "pt"):
        warnings.append(f"{path.name}: stage '{stage}' also runs reference/reward models: only the trained model "
                        "is planned")
    ftype = f.str("finetuning_type") or "lora"
    pure_bf16 = bool(f.bool("pure_bf16"))
    bits = f.int("quantization_bit")
    if bits not in (None, 4):
        unsupported["method"] = f"{path.name}: quantization_bit {bits} is not modelled (4-bit NF4 is)"
    if f.str("quantization_method") not in (None, "bnb", "bitsandbytes"):
        unsupported["method"] = f"{path.name}: quantization_method '{data['quantization_method']}' is not modelled"
    if ftype == "lora":
        out["method"] = "qlora" if bits == 4 else "lora"
        r = f.int("lora_rank") or 8
        out["r"] = r
        a = f.float("lora_alpha")
        out["alpha"] = a if a is not None else 2.0 * r
        out["dropout"] = f.float("lora_dropout", hi=1.0, hi_open=True) or 0.0
        target = f.str("lora_target") or "all"
        out["targets"] = "all-linear" if target.strip().lower() == "all" else target
        if (dora := f.bool("use_dora")) is not None:
            out["use_dora"] = dora
        if pure_bf16:
            out["adapter_dtype"] = "bf16"
        if bits == 4:
            out["double_quant"] = f.bool("double_quantization") is not False
            out["kbit_prep"] = False
    elif ftype == "full":
        if bits:
            raise PlanError(f"{path.name}: quantization_bit with finetuning_type full cannot train")
        out["method"] = "full"
    elif ftype == "freeze":
        n = data.get("freeze_trainable_layers", 2)
        n = f.int("freeze_trainable_layers", minimum=-10**6) if "freeze_trainable_layers" in data else n
        if n is None or n <= 0:
            unsupported["method"] = f"{path.name}: freeze_trainable_layers {n} (the first blocks) is not modelled"
        else:
            out["method"], out["top_k"] = "top", n
        if (f.str("freeze_trainable_modules") or "all") != "all":
            warnings.append(f"{path.name}: freeze_trainable_modules '{data['freeze_trainable_modules']}' trains part "
                            "of each block: planned as whole blocks (an upper bound)")
        if not pure_bf16:
            warnings.append(f"{path.name}: freeze training casts only the trained blocks to fp32: planned with every "
                            "weight in the load dtype")
    else:
        raise PlanError(f"{path.name}: finetuning_type '{ftype}' is not planned (lora, full or freeze)")
    # precision: bf16/fp16 are the Trainer's autocast flags; the model loads in that dtype (LLaMA-Factory's
    # infer_optim_dtype); without pure_bf16 full fine-tuning upcasts the trainable weights to fp32.
    bf16, fp16 = f.bool("bf16"), f.bool("fp16")
    if bf16 and fp16:
        raise PlanError(f"{path.name}: bf16 and fp16 are both true: choose one precision")
    low = "bf16" if (bf16 or pure_bf16) else "fp16" if fp16 else None
    if low:
        if pure_bf16:
            out["dtype"], out["autocast"] = "bf16", "none"
        else:
            out["dtype"] = "fp32" if ftype == "full" else low
            out["autocast"] = low
    elif bf16 is False and fp16 is False:
        out["dtype"], out["autocast"] = "fp32", "none"
    out["seq_len"] = f.int("cutoff_len") or 2048
    if not (f.bool("packing") or f.bool("neat_packing")):
        warnings.append(f"{path.name}: without packing, batches are padded to their longest sequence: "
                        f"the plan's {out['seq_len']} tokens is an upper bound")
    if (b := f.int("per_device_train_batch_size")) is not None:
        out["batch_size"] = b
    if (g := f.int("gradient_accumulation_steps")) is not None:
        out["grad_accum"] = g
    out["grad_checkpointing"] = not f.bool("disable_gradient_checkpointing")
    if out["grad_checkpointing"]:
        out["use_reentrant"] = f.bool("use_reentrant_gc") is not False
    fa = (f.str("flash_attn") or "auto").lower()
    if fa not in ATTENTION:
        raise PlanError(f"{path.name}: flash_attn '{fa}' is not one of {', '.join(ATTENTION)}")
    out["attention"] = ATTENTION[fa]
    if (opt := f.str("optim")) is not None:
        if opt.lower() in OPTIM:
            out["optimizer"], out["foreach"] = OPTIM[opt.lower()]
        else:
            unsupported["optimizer"] = f"{path.name}: optim '{opt}' is not modelled (modelled: {', '.join(OPTIM)})"
    if f.has("max_grad_norm"):
        out["max_grad_norm"] = f.float("max_grad_norm")
    return Source(kind="llamafactory", path=str(path), fields=out, model=f.str("model_name_or_path"),
                  warnings=tuple(warnings), unknown=unknown_keys(data, KNOWN), unsupported=unsupported,
                  defaults=trainer_defaults(data, "optim"))
