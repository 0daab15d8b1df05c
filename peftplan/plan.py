"""A fine-tuning plan: method, its hyper-parameters, and the shape of one training step.

One frozen dataclass serves the estimate, the layers (injection), the tracer and the profiler,
so every path answers for the same configuration.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace


METHODS = ("full", "top", "adapter", "lora", "qlora")
DTYPES = {"bf16": 2, "fp16": 2, "fp32": 4}  # bytes per element
OPTIMIZERS = ("adamw", "adamw8bit", "paged-adamw", "paged-adamw8bit", "sgd", "sgd-momentum")
ATTENTIONS = ("sdpa", "eager")
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
    def uses_lora(self) -> bool:
        return self.method in ("lora", "qlora")

    def with_(self, **changes) -> "Plan":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)
