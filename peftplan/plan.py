"""A fine-tuning plan: method, its hyper-parameters, and the shape of one training step.

One frozen dataclass serves the estimate, the layers (injection), the tracer and the profiler,
so every path answers for the same configuration.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from peftplan.errors import PlanError

METHODS = ("full", "top", "adapter", "lora", "qlora")
DTYPES = {"bf16": 2, "fp16": 2, "fp32": 4}  # bytes per element
OPTIMIZERS = ("adamw", "adamw8bit", "paged-adamw", "paged-adamw8bit", "sgd", "sgd-momentum")
ATTENTIONS = ("sdpa", "eager", "flash")  # flash: transformers' attn_implementation="flash_attention_2"
AUTOCASTS = ("none", "bf16", "fp16")  # the Trainer's bf16=True / fp16=True: torch.autocast around forward + loss
STRATEGIES = ("none", "ddp", "zero1", "zero2", "zero3", "fsdp", "fsdp-grad-op", "fsdp-hybrid")
OFFLOADS = ("none", "optimizer", "optimizer+params")
PLACEMENTS = ("houlsby", "ffn")  # two adapters per block (after attention and after FFN) or one (after FFN)


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
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise PlanError(msg)

        need(self.method in METHODS, f"unknown method '{self.method}' (choose from {', '.join(METHODS)})")
        need(self.dtype in DTYPES, f"unknown dtype '{self.dtype}' (choose from {', '.join(DTYPES)})")
        need(self.optimizer in OPTIMIZERS, f"unknown optimizer '{self.optimizer}' (choose from {', '.join(OPTIMIZERS)})")
        need(self.attention in ATTENTIONS, f"unknown attention '{self.attention}' (choose from {', '.join(ATTENTIONS)})")
        need(self.adapter_placement in PLACEMENTS,
             f"unknown adapter placement '{self.adapter_placement}' (choose from {', '.join(PLACEMENTS)})")
        need(self.batch_size > 0, f"batch size must be positive, got {self.batch_size}")
        need(self.seq_len > 0, f"sequence length must be positive, got {self.seq_len}")
        need(self.adapter_dtype in DTYPES,
             f"unknown adapter dtype '{self.adapter_dtype}' (choose from {', '.join(DTYPES)})")
        need(self.autocast in AUTOCASTS, f"unknown autocast '{self.autocast}' (choose from {', '.join(AUTOCASTS)})")
        need(self.grad_accum >= 1, f"gradient accumulation steps must be at least 1, got {self.grad_accum}")
        need(self.max_grad_norm >= 0, f"max grad norm must be ≥ 0 (0: no clipping), got {self.max_grad_norm}")
        # contradictory precision choices: autocast lowers fp32 ops to one half type; weights loaded in the
        # other half type would run every matmul with mismatched operands
        need(self.autocast == "none" or self.dtype in ("fp32", self.autocast),
             f"autocast {self.autocast} over {self.dtype} weights: load the weights in fp32 (mixed precision) "
             f"or in {self.autocast}")
        need(not (self.uses_lora and DTYPES[self.adapter_dtype] < DTYPES[self.dtype]),
             f"adapter dtype {self.adapter_dtype} is narrower than the {self.dtype} weights (peft only upcasts "
             "adapters)")
        need(not (self.uses_lora and self.adapter_dtype != self.dtype and DTYPES[self.adapter_dtype] == 2),
             f"adapter dtype {self.adapter_dtype} over {self.dtype} weights: peft keeps adapters in the base "
             "dtype or fp32")
        need(not self.use_dora or self.uses_lora, "--dora applies to LoRA and QLoRA only")
        need(self.strategy in STRATEGIES, f"unknown strategy '{self.strategy}' (choose from {', '.join(STRATEGIES)})")
        need(self.offload in OFFLOADS, f"unknown offload '{self.offload}' (choose from {', '.join(OFFLOADS)})")
        need(self.gpus >= 1, f"--gpus must be at least 1, got {self.gpus}")
        need(self.nodes >= 1, f"--nodes must be at least 1, got {self.nodes}")
        need(self.gpus % self.nodes == 0, f"--nodes {self.nodes} does not divide --gpus {self.gpus}")
        for f in ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size",
                  "stage3_max_live_parameters"):
            need(getattr(self, f) >= 0, f"{f} cannot be negative, got {getattr(self, f)}")
        if self.method in ("lora", "qlora"):
            need(self.r > 0, f"LoRA rank r must be positive, got {self.r}")
            need(0.0 <= self.dropout < 1.0, f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.method == "adapter":
            need(self.adapter_size > 0, f"adapter size must be positive, got {self.adapter_size}")
        if self.method == "top":
            need(self.top_k > 0, f"top-k must be positive, got {self.top_k}")

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

    def with_(self, **changes) -> "Plan":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)
