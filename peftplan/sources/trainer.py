"""transformers `TrainingArguments` / TRL `SFTConfig` as Plan fields.

The same mapping reads a saved arguments file (JSON or YAML) and, in the Trainer callback, the live
`TrainingArguments.to_dict()`. Facts checked in the installed transformers 5.24 source:
- `training_args.py`: `optim` defaults to "adamw_torch_fused" on torch ≥ 2.8 (else "adamw_torch");
  `max_grad_norm` 1.0; `bf16`/`fp16` turn on torch.autocast around forward and loss.
- `modeling_utils.py` `_activation_checkpointing_enable`: gradient checkpointing without kwargs runs
  `use_reentrant=False`.
- TRL: `max_length` (older releases `max_seq_length`) caps the tokens per sequence; with `packing` every
  sequence is exactly that long, without it batches are padded to their longest sequence (an upper bound).
"""
from __future__ import annotations

from pathlib import Path

from peftplan.sources.common import Fields, Source, local_model, memory_warnings, unknown_keys

# Trainer `optim` spellings -> (peftplan optimizer, foreach). Fused AdamW updates in one kernel per tensor
# group with no parameter-sized temporary: planned as the non-foreach loop (at most one tensor's temporary).
OPTIM = {
    "adamw_torch": ("adamw", True),
    "adamw_torch_fused": ("adamw", False),
    "adamw_hf": ("adamw", True),
    "adamw_bnb_8bit": ("adamw8bit", True),
    "adamw_8bit": ("adamw8bit", True),
    "paged_adamw_8bit": ("paged-adamw8bit", True),
    "paged_adamw_32bit": ("paged-adamw", True),
    "paged_adamw": ("paged-adamw", True),
    "sgd": ("sgd", True),
}
DEFAULT_OPTIM = "adamw_torch_fused"  # TrainingArguments.optim on torch >= 2.8


def trainer_defaults(data: dict, key: str = "optim") -> dict:
    """The Trainer's defaults for what a file leaves out: its optimizer, and max_grad_norm 1.0."""
    out = {}
    if data.get(key) is None:
        out["optimizer"], out["foreach"] = OPTIM[DEFAULT_OPTIM]
    if data.get("max_grad_norm") is None:
        out["max_grad_norm"] = 1.0
    return out

# keys that change memory but that the plan does not model
UNMODELLED = {
    "deepspeed": "DeepSpeed ZeRO sharding",
    "fsdp": "FSDP sharding",
    "fsdp_config": "FSDP sharding",
    "torch_compile": "torch.compile fusions",
    "use_liger_kernel": "Liger fused kernels (fused linear cross-entropy keeps no logits)",
    "padding_free": "padding-free batches",
    "activation_offloading": "activation offloading to the CPU",
    "auto_find_batch_size": "batch size search at run time",
    "neftune_noise_alpha": "NEFTune embedding noise",
    "optim_target_modules": "GaLore/APOLLO projected optimizer",
    "group_by_length": "length-grouped batches",
}

KNOWN = set(UNMODELLED) | {
    "per_device_train_batch_size", "gradient_accumulation_steps", "bf16", "fp16", "gradient_checkpointing",
    "gradient_checkpointing_kwargs", "optim", "max_seq_length", "max_length", "packing", "max_grad_norm",
    "model_init_kwargs", "model_name_or_path", "output_dir", "learning_rate", "num_train_epochs", "max_steps",
    "logging_steps", "save_steps", "save_strategy", "eval_strategy", "evaluation_strategy", "eval_steps",
    "warmup_steps", "warmup_ratio", "lr_scheduler_type", "weight_decay", "adam_beta1", "adam_beta2",
    "adam_epsilon", "seed", "report_to", "run_name", "logging_dir", "save_total_limit", "tf32", "dataloader_num_workers",
    "remove_unused_columns", "dataset_text_field", "per_device_eval_batch_size", "push_to_hub", "hub_model_id",
    "logging_first_step", "bf16_full_eval", "fp16_full_eval", "optim_args", "do_train", "do_eval",
    "overwrite_output_dir", "label_names", "dataset_num_proc", "completion_only_loss", "assistant_only_loss",
    "dataset_kwargs", "eval_packing", "packing_strategy", "data_seed", "local_rank", "ddp_find_unused_parameters",
    "disable_tqdm", "load_best_model_at_end", "metric_for_best_model", "greater_is_better", "lr_scheduler_kwargs",
    "torch_empty_cache_steps", "chat_template_path", "use_cpu", "dataloader_pin_memory",
}

TRL_KEYS = {"max_seq_length", "max_length", "packing", "dataset_text_field", "model_init_kwargs",
            "completion_only_loss", "assistant_only_loss", "padding_free", "packing_strategy", "eval_packing"}


def looks_like(data: dict) -> bool:
    return "per_device_train_batch_size" in data or "optim" in data or "gradient_accumulation_steps" in data


def load_dtype(data: dict, f: Fields) -> str | None:
    """The weights' dtype when the file says it (TRL's model_init_kwargs torch_dtype / dtype)."""
    mik = data.get("model_init_kwargs")
    if not isinstance(mik, dict):
        return None
    v = mik.get("dtype", mik.get("torch_dtype"))
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "bf16": "bf16", "fp16": "fp16",
            "fp32": "fp32"}.get(str(v).removeprefix("torch.")) if v is not None else None


def read_trainer(data: dict, path: Path) -> Source:
    """TrainingArguments / SFTConfig fields as Plan fields. Raises PlanError for wrong types or
    contradictions (bf16 and fp16 both on)."""
    from peftplan.errors import PlanError

    f = Fields(data, path)
    out: dict = {}
    defaults: dict = trainer_defaults(data)
    warnings: list[str] = []
    unsupported: dict = {}
    if (b := f.int("per_device_train_batch_size")) is not None:
        out["batch_size"] = b
    if (g := f.int("gradient_accumulation_steps")) is not None:
        out["grad_accum"] = g
    bf16, fp16 = f.bool("bf16"), f.bool("fp16")
    if bf16 and fp16:
        raise PlanError(f"{path.name}: bf16 and fp16 are both true: choose one precision")
    if bf16 is not None or fp16 is not None:
        out["autocast"] = "bf16" if bf16 else "fp16" if fp16 else "none"
    dtype = load_dtype(data, f)
    if dtype:
        out["dtype"] = dtype
    elif bf16 or fp16:
        assumed = "bf16" if bf16 else "fp16"
        defaults["dtype"] = assumed
        warnings.append(f"{path.name}: the weights' load dtype is not in the file: assumed {assumed} "
                        "(transformers 5 loads a checkpoint in its own dtype; pass --dtype fp32 for fp32 master weights"
                        + (", which fp16 full fine-tuning needs: the GradScaler refuses fp16 gradients)" if fp16 else ")"))
    if (ckpt := f.bool("gradient_checkpointing")) is not None:
        out["grad_checkpointing"] = ckpt
        reentrant = f.use_reentrant()
        if ckpt:
            out["use_reentrant"] = reentrant
    if (opt := f.str("optim")) is not None:
        name = opt.lower()
        if name in OPTIM:
            out["optimizer"], out["foreach"] = OPTIM[name]
        else:
            unsupported["optimizer"] = f"{path.name}: optim '{opt}' is not modelled (modelled: {', '.join(OPTIM)})"
    seq = f.int("max_length") if f.has("max_length") else f.int("max_seq_length")
    if seq is not None:
        out["seq_len"] = seq
        if f.bool("packing") is False or (not f.has("packing") and TRL_KEYS & set(data)):
            warnings.append(f"{path.name}: without packing, batches are padded to their longest sequence: "
                            f"the plan's {seq} tokens is an upper bound")
    if f.has("max_grad_norm"):
        out["max_grad_norm"] = f.float("max_grad_norm")
    model = None
    if (name := f.str("model_name_or_path")) is not None:
        model = name
    warnings += memory_warnings(data, UNMODELLED, path)
    unk = unknown_keys(data, KNOWN)
    return Source(kind="trainer", path=str(path), fields=out, model=model, warnings=tuple(warnings),
                  unknown=unk, unsupported=unsupported, defaults=defaults)


__all__ = ["read_trainer", "looks_like", "OPTIM", "DEFAULT_OPTIM", "trainer_defaults", "local_model"]
