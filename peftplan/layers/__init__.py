"""Our PEFT layers: Houlsby adapters, LoRA and QLoRA (LoRA over a bitsandbytes NF4 base).

Importing this package imports torch (and transformers for GPT-2's Conv1D), never bitsandbytes until a
4-bit base is made.
"""
from peftplan.layers.adapter import Adapter, AdapterAfter
from peftplan.layers.lora import LoRALinear, in_out_features, is_conv1d, is_linear, is_linear4bit, to_linear4bit

__all__ = ["Adapter", "AdapterAfter", "LoRALinear", "in_out_features", "is_conv1d", "is_linear", "is_linear4bit",
           "to_linear4bit"]
