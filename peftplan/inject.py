"""Apply a plan to a transformers model: wrap, quantize, freeze by declared names.

    lora     LoRALinear around each target (peft's matching rules: exact name or ".suffix", "all-linear" =
             every Linear/Conv1D but the output head, "re:REGEX" matched in full); only A and B train.
    qlora    every Linear/Conv1D but the output head becomes a bitsandbytes NF4 Linear4bit (double quantization
             per plan, bf16 compute), LoRA wraps the targets; with `plan.kbit_prep` the k-bit preparation
             users run (peft's prepare_model_for_kbit_training) stores every other parameter in fp32.
    adapter  a Houlsby adapter after the attention output projection and after the FFN output projection of
             every block, before the residual add ("ffn" placement: after the FFN only); adapters and all
             LayerNorm/RMSNorm parameters train (Houlsby et al. 2019, §2.1 and §3).
    top      the last top_k blocks train.
    full     everything trains.

Works on a meta model (the usual path: `peftplan.measure.step.build_model` materializes afterwards) and on a
model with real weights. Validation goes through `params.count`, so bad input fails with the estimate's messages.
"""
from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from peftplan.planning.cards import ModelCard
from peftplan.errors import PlanError
from peftplan.layers import (Adapter, AdapterAfter, LoRALinear, in_out_features, is_linear, is_linear4bit,
                             to_linear4bit)
from peftplan.planning.layout import layout
from peftplan.planning.moe_targets import PEFT_MOE_FAMILY
from peftplan.planning.params import count, lora_targets, parse_targets
from peftplan.plan import Plan

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}



def adapter_sites(card: ModelCard) -> tuple[str, str]:
    """(attention output, FFN output): the block Linears with roles attn_out and ffn_out (layout.Linear.role,
    read from transformers' module tree for generated cards). Wrapping them puts an adapter on each sublayer's
    output before the residual add, Houlsby's place, in every family.

    Raises:
        PlanError: the block has no attention or no FFN output Linear (e.g. fused 3-D experts, which are
            parameters, not Linears).
    """
    lin = layout(card).block_linears
    sites = tuple(next((x.name for x in lin if x.role == role), "") for role in ("attn_out", "ffn_out"))
    if not all(sites):
        missing = " and ".join(r for r, n in zip(("attention output", "FFN output"), sites) if not n)
        raise PlanError(f"{card.name}: Houlsby adapters need a block {missing} Linear, and the block has none")
    return sites


@dataclass(frozen=True)
class Injection:
    method: str
    wrapped: tuple[str, ...]  # modules now a LoRALinear (lora/qlora) or an AdapterAfter (adapter)
    quantized: tuple[str, ...]  # modules now a bitsandbytes NF4 Linear4bit (qlora; a LoRA target's is "<name>.base")
    trainable: tuple[str, ...]  # parameter names (model.named_parameters) that train
    upcast: tuple[str, ...]  # base parameter names that k-bit preparation stores in fp32 instead of plan.dtype
    adapter_dtype: str  # dtype of the LoRA/adapter parameters ("fp32" under k-bit preparation)


# ---------------------------------------------------------------- matching (peft's rules, on the real model)


def is_norm(module: nn.Module) -> bool:
    """LayerNorm or RMSNorm, by class as transformers itself recognises them (their names vary by family)."""
    name = type(module).__name__
    return isinstance(module, nn.LayerNorm) or "LayerNorm" in name or "RMSNorm" in name


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear/Conv1D of the model but the output head, by full module name."""
    head = model.get_output_embeddings()
    return {name: m for name, m in model.named_modules() if is_linear(m) and m is not head}


def kept_in_fp32(model: nn.Module, name: str) -> bool:
    """Whether a 4-bit load leaves this Linear unquantized: transformers' bitsandbytes quantizer adds the class's
    `_keep_in_fp32_modules` (T5: `wo`) to `modules_to_not_convert` (quantizers/base.py
    `get_modules_to_not_convert`), matched on the module name's components; the module keeps the load dtype."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or ()
    return any(k in name.split(".") for k in keep)


def match_targets(names: list[str], spec: str | None, model_type: str) -> list[str]:
    """The module names peft's LoRA would wrap: exact name or ".suffix", "all-linear", or a full regex match."""
    kind, targets = parse_targets(spec, model_type)
    if kind == "all-linear":
        hits = list(names)
    elif kind == "regex":
        pattern = re.compile(targets[0])
        hits = [n for n in names if pattern.fullmatch(n)]
    else:
        hits = [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]
    if not hits:
        candidates = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise PlanError(f"LoRA targets '{spec if spec is not None else ','.join(targets)}' match no Linear of the "
                        f"model (candidates: {', '.join(candidates)})")
    return hits


# ---------------------------------------------------------------- injection


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _check(model: nn.Module, card: ModelCard, plan: Plan) -> None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type != card.model_type:
        raise PlanError(f"the model is a '{model_type}' but the card '{card.name}' describes a '{card.model_type}'")
    if any(isinstance(m, (LoRALinear, AdapterAfter)) for m in model.modules()):
        raise PlanError("the model already holds LoRA or adapter layers")
    count(card, plan)  # r, targets, adapter size, top-k: the estimate's checks and messages


def kbit_prepare(model: nn.Module) -> tuple[str, ...]:
    """peft's prepare_model_for_kbit_training cast: every fp16/bf16 parameter but the 4-bit weights -> fp32.

    Returns the names cast. (bitsandbytes casts a Linear4bit's bias back to the compute dtype on its first
    forward, so those biases are fp32 only until then.)
    """
    cast = []
    for name, p in model.named_parameters():
        if p.dtype in (torch.float16, torch.bfloat16) and type(p).__name__ != "Params4bit":
            p.data = p.data.to(torch.float32)
            cast.append(name)
    return tuple(cast)


def _inject_lora(model: nn.Module, card: ModelCard, plan: Plan, adapter_dtype: torch.dtype) -> dict:
    """LoRA around the targets; for QLoRA every Linear/Conv1D but the head first becomes an NF4 Linear4bit."""
    if any(lin.role == "param_lora" for lin, _, _ in lora_targets(card, plan.targets)):
        raise PlanError("LoRA on fused expert parameters is peft's ParamWrapper: build it with peft (--impl peft)")
    linears = linear_modules(model)
    targets = match_targets(list(linears), plan.targets, card.model_type)
    if plan.method == "qlora":
        compute = torch.float16 if plan.dtype == "fp16" else torch.bfloat16  # QLoRA computes in bf16
        for name, lin in linears.items():
            if not kept_in_fp32(model, name):
                _replace(model, name, to_linear4bit(lin, double_quant=plan.double_quant, compute_dtype=compute))
    for name in targets:
        base = model.get_submodule(name)
        _replace(model, name, LoRALinear(base, plan.r, plan.alpha, plan.dropout, dtype=adapter_dtype))
    upcast = ()
    if plan.method == "qlora" and plan.kbit_prep:  # LoRA is fp32 already, as peft creates it after the preparation
        upcast = kbit_prepare(model)
    return dict(wrapped=tuple(targets), upcast=upcast,
                quantized=tuple(n for n, m in model.named_modules() if is_linear4bit(m)),  # a target's: "<name>.base"
                trainable={f"{n}.lora_{x}.weight" for n in targets for x in "ab"})


def _inject_adapters(model: nn.Module, card: ModelCard, plan: Plan, adapter_dtype: torch.dtype) -> dict:
    """Houlsby adapters on the block's output projections; adapters and every LayerNorm/RMSNorm train."""
    attn, ffn = adapter_sites(card)
    sites = (attn, ffn) if plan.adapter_placement == "houlsby" else (ffn,)
    names = [layout(card).block_name(i, rel) for i in range(card.n_layers) for rel in sites]
    trainable: set[str] = set()
    for name in names:
        base = model.get_submodule(name)
        adapter = Adapter(in_out_features(base)[1], plan.adapter_size, device=base.weight.device, dtype=adapter_dtype)
        _replace(model, name, AdapterAfter(base, adapter))
        trainable |= {f"{name}.adapter.{p}" for p, _ in adapter.named_parameters()}
    for mname, m in model.named_modules():
        if is_norm(m):
            trainable |= {f"{mname}.{p}" for p, _ in m.named_parameters(recurse=False)}
    return dict(wrapped=tuple(names), trainable=trainable)


def inject(model: nn.Module, card: ModelCard, plan: Plan) -> Injection:
    """Apply `plan` to `model` (built from `card`) in place and freeze all but the method's parameters.

    LoRA's A and B take plan.adapter_dtype (fp32 by default, as peft), Houlsby adapters plan.dtype;
    requires_grad is set by the
    declared names (`p.requires_grad_(name in trainable)`), never by matching a substring.

    Raises:
        PlanError: a model/card mismatch, a block without attention/FFN output Linears (adapter), targets matching nothing
            (with the candidate names), r larger than a target matrix, no default targets for the model type
            (phi3), an adapter wider than d, top_k above the number of blocks.
    """
    _check(model, card, plan)
    adapter_dtype = TORCH_DTYPES[plan.adapter_dtype] if plan.uses_lora else TORCH_DTYPES[plan.dtype]
    names = [n for n, _ in model.named_parameters()]
    if plan.uses_lora:
        done = _inject_lora(model, card, plan, adapter_dtype)
    elif plan.method == "adapter":
        done = _inject_adapters(model, card, plan, adapter_dtype)
    elif plan.method == "top":
        lay = layout(card)
        blocks = tuple(f"{lay.block_prefix}.{i}." for i in range(card.n_layers - plan.top_k, card.n_layers))
        done = dict(trainable={n for n in names if n.startswith(blocks)})
    else:  # full
        done = dict(trainable=set(names))
    trainable = done.pop("trainable")
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    return Injection(method=plan.method, wrapped=done.get("wrapped", ()), quantized=done.get("quantized", ()),
                     trainable=tuple(n for n, _ in model.named_parameters() if n in trainable),
                     upcast=done.get("upcast", ()),
                     adapter_dtype=next(k for k, v in TORCH_DTYPES.items() if v == adapter_dtype))


# ---------------------------------------------------------------- peft's own LoRA (what users run)


def peft_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("peft") is not None


@contextlib.contextmanager
def _meta_dora_init(plan: Plan):
    """QLoRA + DoRA on the meta skeleton: peft's `DoraLinearLayer.update_layer` deep-copies each Linear4bit (for
    FSDP) and dequantizes it to initialise the magnitude with the weight norm, neither of which a meta NF4 weight
    supports. Both happen once at load time and only the magnitude's shape (d_out) outlives them, so for the
    duration of get_peft_model the copy is skipped and the dequantized weight is an empty meta tensor of the
    weight's shape. In the step, `_fake_nf4_dequantize` lets peft's DoRA forward dequantize the fake NF4 weight."""
    if not (plan.use_dora and plan.method == "qlora"):
        yield
        return
    from peft.tuners.lora import dora

    _fake_nf4_dequantize()
    saved = dora.deepcopy, dora.dequantize_module_weight

    def dequantize(module):
        if is_linear4bit(module) and module.weight.device.type == "meta":
            return torch.empty(module.out_features, module.in_features, dtype=module.compute_dtype, device="meta")
        return saved[1](module)

    dora.deepcopy, dora.dequantize_module_weight = (lambda m: m), dequantize
    try:
        yield
    finally:
        dora.deepcopy, dora.dequantize_module_weight = saved


def _fake_nf4_dequantize() -> None:
    """Under fake tensors an NF4 weight is a plain Parameter carrying Params4bit's attributes (`attach_nf4`), which
    peft's `dequantize_module_weight` would return undequantized (it tests the class name). Wrap it once so that
    such a weight is dequantized as peft dequantizes a Params4bit (`bnb.functional.dequantize_4bit(weight.data,
    weight.quant_state)`); every other weight goes to peft's own function unchanged."""
    from peft.tuners.lora import dora

    if getattr(dora.dequantize_module_weight, "peftplan_fake_nf4", False):
        return
    original = dora.dequantize_module_weight

    def dequantize(module):
        w = getattr(module, "weight", None)
        if is_linear4bit(module) and getattr(w, "quant_state", None) is not None and type(w).__name__ != "Params4bit":
            import bitsandbytes as bnb

            return bnb.functional.dequantize_4bit(w.data, w.quant_state)
        return original(module)

    dequantize.peftplan_fake_nf4 = True
    dora.dequantize_module_weight = dequantize


def inject_peft(model: nn.Module, card: ModelCard, plan: Plan) -> tuple[nn.Module, Injection]:
    """LoRA/QLoRA/DoRA built by peft's own `get_peft_model`, as users run it; returns (PeftModel, Injection).

    QLoRA: every Linear/Conv1D but the head first becomes an NF4 `Linear4bit` (what `from_pretrained` with a
    BitsAndBytesConfig loads), then, with `plan.kbit_prep`, peft's `prepare_model_for_kbit_training` cast
    (checkpointing is left to the step). `autocast_adapter_dtype=True` (peft's default) leaves A and B in fp32;
    another `plan.adapter_dtype` is set on them afterwards. Target names are resolved by `match_targets`
    (peft's rules) and handed to peft as full module names.
    """
    from peft import LoraConfig, get_peft_model

    _check(model, card, plan)
    if not plan.uses_lora:
        raise PlanError(f"impl=peft builds LoRA, QLoRA and DoRA, not '{plan.method}'")
    linears = linear_modules(model)
    targets = match_targets(list(linears), plan.targets, card.model_type)
    upcast: tuple[str, ...] = ()
    if plan.method == "qlora":
        compute = torch.float16 if plan.dtype == "fp16" else torch.bfloat16
        for name, lin in linears.items():
            if not kept_in_fp32(model, name):
                _replace(model, name, to_linear4bit(lin, double_quant=plan.double_quant, compute_dtype=compute))
        if plan.kbit_prep:
            upcast = kbit_prepare(model)  # the cast of peft.utils.other.prepare_model_for_kbit_training
        # transformers sets this on a 4-bit load; peft then wraps each Linear4bit in its bitsandbytes LoRA class
        # (peft/tuners/lora/bnb.py Linear4bit: the base output cloned, no input cast under autocast)
        model.is_loaded_in_4bit = True
    if card.model_type in PEFT_MOE_FAMILY:  # peft itself rewrites these targets onto the fused experts (moe_targets)
        kind, names = parse_targets(plan.targets, card.model_type)
        targets = "all-linear" if kind == "all-linear" else list(names)
    config = LoraConfig(r=plan.r, lora_alpha=plan.alpha, lora_dropout=plan.dropout, target_modules=targets,
                        use_dora=plan.use_dora, bias="none")
    with _meta_dora_init(plan), warnings.catch_warnings():
        # peft 0.21's PeftModel.__init__ reads transformers 5's deprecated name
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    adapter_dtype = TORCH_DTYPES[plan.adapter_dtype]
    trainable = []
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            p.data = p.data.to(adapter_dtype)
            trainable.append(name)
    quantized = tuple(n for n, m in peft_model.named_modules() if is_linear4bit(m))
    return peft_model, Injection(method=plan.method, wrapped=tuple(targets), quantized=quantized,
                                 trainable=tuple(trainable), upcast=upcast, adapter_dtype=plan.adapter_dtype)
