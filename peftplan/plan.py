"""A fine-tuning plan: method, its hyper-parameters, and the shape of one training step.

One frozen dataclass serves the estimate, the layers (injection), the tracer and the profiler,
so every path answers for the same configuration.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace


METHODS = ("full", "top", "adapter", "lora", "qlora")
DTYPES = {"bf16": 2, "fp16": 2, "fp32": 4}  # bytes per element
OPTIMIZERS = ("adamw", "adamw8bit", "paged-adamw", "paged-adamw8bit", "sgd", "sgd-momentum")
ATTENTIONS = ("sdpa", "eager", "flash")  # flash: transformers' attn_implementation="flash_attention_2"
AUTOCASTS = ("none", "bf16", "fp16")  # the Trainer's bf16=True / fp16=True: torch.autocast around forward + loss
STRATEGIES = ("none", "ddp", "zero1", "zero2", "zero3", "fsdp", "fsdp-grad-op", "fsdp-hybrid")
OFFLOADS = ("none", "optimizer", "optimizer+params")
PLACEMENTS = ("houlsby", "ffn")  # two adapters per block (after attention and after FFN) or one (after FFN)
# mixture of experts: the routing the trace forces and the estimate assumes (peftplan/planning/moe.py)
MOE_ROUTINGS = ("balanced", "worst")


@dataclass(frozen=True)
class Plan:
    method: str = "lora"
    # -- LoRA / QLoRA (Hu et al. 2021; Dettmers et al. 2023)
    r: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str | None = None  # None: peft's defaults for the model type; "all-linear"; "a,b,c"; "re:REGEX"
    double_quant: bool = True  # NF4 with double quantization of the absmax constants
    kbit_prep: bool = True  # prepare_model_for_kbit_training: non-quantized weights upcast to fp32
    # -- Adapters (Houlsby et al. 2019)
    adapter_size: int = 64  # bottleneck m
    adapter_placement: str = "houlsby"
    # -- top-k baseline
    top_k: int = 2
    # -- the step
    batch_size: int = 1
    seq_len: int = 512
    dtype: str = "bf16"  # storage and compute dtype of the model
    optimizer: str = "adamw"
    foreach: bool = True  # torch AdamW/SGD default on CUDA: a multi-tensor step with params-sized temporaries
    grad_checkpointing: bool = False
    attention: str = "sdpa"
    # -- the stack users run (peft, the HF Trainer)
    adapter_dtype: str = "fp32"  # LoRA A/B dtype: peft's autocast_adapter_dtype=True upcasts bf16/fp16 to fp32
    use_dora: bool = False  # peft's LoraConfig(use_dora=True): DoRA (Liu et al. 2024) magnitude + weight norm
    autocast: str = "none"  # TrainingArguments(bf16=True) -> "bf16", (fp16=True) -> "fp16": torch.autocast
    grad_accum: int = 1  # TrainingArguments.gradient_accumulation_steps: micro-steps per optimizer step
    max_grad_norm: float = 1.0  # TrainingArguments.max_grad_norm: clip_grad_norm_ before the step (0: off)
    use_reentrant: bool = False  # gradient_checkpointing_kwargs["use_reentrant"]; transformers 5 defaults to False
    # -- mixture of experts: balanced = t·k/E tokens per expert; worst = every token to the same k experts
    moe_routing: str = "balanced"
    logits_shift_copy: bool = False  # transformers <= 4.48's causal-LM loss: a contiguous fp32 copy of shifted logits
    # -- past one GPU (planning/distributed.py)
    gpus: int = 1  # world size W (all nodes)
    nodes: int = 1
    strategy: str = "none"  # none (DDP when gpus > 1) | ddp | zero1 | zero2 | zero3 | fsdp | fsdp-grad-op | fsdp-hybrid
    offload: str = "none"  # none | optimizer | optimizer+params (ZeRO-Offload / FSDP CPUOffloadPolicy)
    reduce_bucket_size: int = 500_000_000  # DeepSpeed zero_optimization defaults (elements)
    allgather_bucket_size: int = 500_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_max_live_parameters: int = 1_000_000_000

    def __post_init__(self) -> None:
        from peftplan.planning.validate import validate_plan  # the one table of field checks

        validate_plan(self)

    @property
    def bytes_per_element(self) -> int:
        return DTYPES[self.dtype]

    @property
    def tokens(self) -> int:
        """Tokens in one step, b·s."""
        return self.batch_size * self.seq_len

    @property
    def mixed_precision(self) -> bool:
        """fp32 master weights, gradients and states with autocast compute (the Trainer's AMP)."""
        return self.autocast != "none" and self.dtype == "fp32"

    @property
    def compute_dtype(self) -> str:
        """dtype the matmuls run in: the autocast dtype, else the weights'."""
        return self.autocast if self.autocast != "none" else self.dtype

    @property
    def uses_lora(self) -> bool:
        return self.method in ("lora", "qlora")

    def ignored_options(self) -> tuple[str, ...]:
        """Fields set away from their defaults that this plan's method never reads (`--r 64` with `--method
        full`): the CLI flag and value of each, for a warning. `RELEVANT` says which plans read which field."""
        default = Plan()

        def flag(name: str, v) -> str:
            name = name.replace("_", "-")
            return (f"--{name}" if v else f"--no-{name}") if isinstance(v, bool) else f"--{name} {v}"

        return tuple(flag(name, getattr(self, name)) for name, reads in RELEVANT.items()
                     if getattr(self, name) != getattr(default, name) and not reads(self))

    def with_(self, **changes) -> "Plan":
        return replace(self, **changes)

    def with_method(self, method: str, **changes) -> "Plan":
        """This plan for another method (reports and fit matrices compare methods): DoRA kept where it applies
        (LoRA, QLoRA), dropped elsewhere."""
        return replace(self, method=method, use_dora=self.use_dora and method in ("lora", "qlora"), **changes)

    def to_dict(self) -> dict:
        return asdict(self)


# Fields only some plans read: a LoRA rank means nothing to full fine-tuning. The random draw resets the others
# to their defaults (peftplan/trace/random_check.py); the estimate warns when a user sets one (Plan.ignored_options)
RELEVANT = {
    "r": lambda p: p.uses_lora, "alpha": lambda p: p.uses_lora, "dropout": lambda p: p.uses_lora,
    "targets": lambda p: p.uses_lora, "adapter_dtype": lambda p: p.uses_lora,
    "double_quant": lambda p: p.method == "qlora", "kbit_prep": lambda p: p.method == "qlora",
    "adapter_size": lambda p: p.method == "adapter", "adapter_placement": lambda p: p.method == "adapter",
    "top_k": lambda p: p.method == "top",
    "use_reentrant": lambda p: p.grad_checkpointing,
}
