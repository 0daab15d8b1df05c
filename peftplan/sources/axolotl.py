"""An axolotl YAML as Plan fields.

Keys as axolotl's config reference spells them (docs/config-reference): `base_model`, `adapter` (lora | qlora;
absent = full fine-tuning), `lora_r`, `lora_alpha`, `lora_dropout`, `lora_target_modules`, `lora_target_linear`
(all linear layers), `peft_use_dora`, `load_in_4bit` / `load_in_8bit`, `sequence_len`, `sample_packing`,
`micro_batch_size`, `gradient_accumulation_steps`, `bf16` / `fp16` (true, false or "auto"), `gradient_checkpointing`
(+ `gradient_checkpointing_kwargs`), `optimizer` (the Trainer's optim names), `flash_attention` / `sdp_attention` /
`eager_attention`, `max_grad_norm`. axolotl loads the model in the precision it trains in (bf16 weights with the
Trainer's bf16 autocast), wraps it with peft (fp32 adapters) and, for 4/8-bit loading with an adapter, runs peft's
`prepare_model_for_kbit_training`.
"""
from __future__ import annotations

from pathlib import Path

from peftplan.errors import PlanError
from peftplan.sources.common import Fields, Source, memory_warnings, unknown_keys
from peftplan.sources.trainer import OPTIM, trainer_defaults

UNMODELLED = {
    "deepspeed": "DeepSpeed ZeRO sharding",
    "fsdp": "FSDP sharding",
    "fsdp_config": "FSDP sharding",
    "lora_modules_to_save": "a trainable full copy of each listed module",
    "lora_layers_to_transform": "LoRA on some blocks only",
    "xformers_attention": "xFormers attention",
    "unsloth_lora_mlp": "Unsloth fused kernels",
    "unsloth_lora_qkv": "Unsloth fused kernels",
    "liger_fused_linear_cross_entropy": "fused linear cross-entropy (no logits kept)",
    "torch_compile": "torch.compile fusions",
    "relora_steps": "ReLoRA restarts",
    "s2_attention": "shifted sparse attention",
    "gradient_checkpointing_offload": "activation offloading",
}

KNOWN = set(UNMODELLED) | {
    "base_model", "base_model_config", "model_type", "tokenizer_type", "adapter", "lora_r", "lora_alpha",
    "lora_dropout", "lora_target_modules", "lora_target_linear", "peft_use_dora", "load_in_4bit", "load_in_8bit",
    "sequence_len", "sample_packing", "pad_to_sequence_len", "micro_batch_size", "gradient_accumulation_steps",
    "bf16", "fp16", "tf32", "gradient_checkpointing", "gradient_checkpointing_kwargs", "optimizer",
    "flash_attention", "sdp_attention", "eager_attention", "max_grad_norm", "datasets", "dataset_prepared_path",
    "val_set_size", "output_dir", "num_epochs", "max_steps", "learning_rate", "lr_scheduler", "warmup_steps",
    "warmup_ratio", "weight_decay", "logging_steps", "saves_per_epoch", "evals_per_epoch", "eval_steps",
    "save_steps", "wandb_project", "wandb_entity", "wandb_name", "wandb_log_model", "wandb_watch",
    "special_tokens", "train_on_inputs", "group_by_length", "seed", "strict", "chat_template", "lora_fan_in_fan_out",
    "lora_model_dir", "resume_from_checkpoint", "early_stopping_patience", "local_rank", "xformers_attention",
    "flash_attn_cross_entropy", "flash_attn_rms_norm", "debug", "hub_model_id", "trust_remote_code",
    "eval_sample_packing", "plugins", "tokens", "auto_resume_from_checkpoints", "save_total_limit",
}


def looks_like(data: dict) -> bool:
    return "base_model" in data or "micro_batch_size" in data or "sequence_len" in data


def _precision(f: Fields) -> tuple[str | None, str | None]:
    bf16, fp16 = f.bool("bf16", auto=True), f.bool("fp16", auto=False)
    if bf16 and fp16:
        raise PlanError(f"{f.path.name}: bf16 and fp16 are both true: choose one precision")
    if bf16:
        return "bf16", "bf16"
    if fp16:
        return "fp16", "fp16"
    if bf16 is False or fp16 is False:
        return "fp32", "none"
    return None, None


def read_axolotl(data: dict, path: Path) -> Source:
    f = Fields(data, path)
    out: dict = {}
    unsupported: dict = {}
    warnings = list(memory_warnings(data, UNMODELLED, path))
    adapter = f.str("adapter")
    four, eight = f.bool("load_in_4bit"), f.bool("load_in_8bit")
    if adapter not in (None, "", "lora", "qlora"):
        raise PlanError(f"{path.name}: adapter '{adapter}' is not planned (lora, qlora, or none for full fine-tuning)")
    if adapter == "qlora" and not four:
        raise PlanError(f"{path.name}: adapter qlora needs load_in_4bit: true")
    if four and eight:
        raise PlanError(f"{path.name}: load_in_4bit and load_in_8bit are both true")
    if eight:
        unsupported["method"] = f"{path.name}: load_in_8bit (LLM.int8) is not modelled"
    if adapter in ("lora", "qlora"):
        out["method"] = "qlora" if four else "lora"
        if (r := f.int("lora_r")) is not None:
            out["r"] = r
        if (a := f.float("lora_alpha")) is not None:
            out["alpha"] = a
        if (d := f.float("lora_dropout", hi=1.0, hi_open=True)) is not None:
            out["dropout"] = d
        if f.bool("lora_target_linear"):
            out["targets"] = "all-linear"
            if f.has("lora_target_modules"):
                warnings.append(f"{path.name}: lora_target_linear is true: lora_target_modules adds nothing")
        elif (t := f.targets("lora_target_modules")) is not None:
            out["targets"] = t
        if (dora := f.bool("peft_use_dora")) is not None:
            out["use_dora"] = dora
    elif adapter in (None, ""):
        if four:
            raise PlanError(f"{path.name}: load_in_4bit without an adapter cannot train (set adapter: qlora)")
        out["method"] = "full"
    if (s := f.int("sequence_len")) is not None:
        out["seq_len"] = s
        if not f.bool("sample_packing") and not f.bool("pad_to_sequence_len"):
            warnings.append(f"{path.name}: without sample_packing, batches are padded to their longest sequence: "
                            f"the plan's {s} tokens is an upper bound")
    if (b := f.int("micro_batch_size")) is not None:
        out["batch_size"] = b
    if (g := f.int("gradient_accumulation_steps")) is not None:
        out["grad_accum"] = g
    dtype, autocast = _precision(f)
    if dtype:
        out["dtype"], out["autocast"] = dtype, autocast
    ckpt = data.get("gradient_checkpointing")
    if ckpt is not None:
        if isinstance(ckpt, str) and ckpt.lower() in ("unsloth", "offload"):
            warnings.append(f"{path.name}: gradient_checkpointing '{ckpt}' offloads checkpoints to the CPU: "
                            "planned as plain checkpointing (an upper bound)")
            out["grad_checkpointing"] = True
        else:
            out["grad_checkpointing"] = f.bool("gradient_checkpointing")
        reentrant = f.use_reentrant()
        if out["grad_checkpointing"]:
            out["use_reentrant"] = reentrant
    if (opt := f.str("optimizer")) is not None:
        if opt.lower() in OPTIM:
            out["optimizer"], out["foreach"] = OPTIM[opt.lower()]
        else:
            unsupported["optimizer"] = f"{path.name}: optimizer '{opt}' is not modelled (modelled: {', '.join(OPTIM)})"
    attn = [k for k in ("flash_attention", "sdp_attention", "eager_attention") if f.bool(k)]
    if len(attn) > 1:
        raise PlanError(f"{path.name}: {' and '.join(attn)} are all true: choose one attention")
    if attn:
        out["attention"] = {"flash_attention": "flash", "sdp_attention": "sdpa", "eager_attention": "eager"}[attn[0]]
    if f.has("max_grad_norm"):
        out["max_grad_norm"] = f.float("max_grad_norm")
    return Source(kind="axolotl", path=str(path), fields=out, model=f.str("base_model"), warnings=tuple(warnings),
                  unknown=unknown_keys(data, KNOWN), unsupported=unsupported,
                  defaults=trainer_defaults(data, "optimizer"))
