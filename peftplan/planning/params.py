"""Exact parameter accounting per method, from a card's layout alone (no torch).

    LoRA (Hu et al. 2021, §4.1): W0 + B·A with A ∈ R^{r×d_in}, B ∈ R^{d_out×r}: r·(d_in + d_out) per matrix.
    Adapter (Houlsby et al. 2019, §2.1): down d→m and up m→d with biases: 2md + d + m per adapter.
    NF4 + double quantization (Dettmers et al. 2023, §3): 4 + 8/64 + 32/(64·256) bits per weight,
    plus bitsandbytes' fixed per-tensor constants.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

from peftplan.planning.cards import ModelCard
from peftplan.errors import PlanError, quote
from peftplan.planning.layout import Linear, layout
from peftplan.planning.moe_targets import PEFT_MOE_FAMILY, param_lora_shape, rewrite
from peftplan.plan import Plan
from peftplan.planning import seq2seq

# peft's default LoRA targets by model type: peft 0.21 peft/utils/constants.py,
# TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING (its list entries; tests compare the two).
# Types absent here (phi3, qwen3_moe, olmo2, deepseek_v2, gpt_oss, gemma3, modernbert, ...) have no default:
# peft raises "Please specify `target_modules`", and so does peftplan.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "t5": ("q", "v"), "mt5": ("q", "v"), "bart": ("q_proj", "v_proj"), "gpt2": ("c_attn",),
    "bloom": ("query_key_value",), "blip-2": ("q", "v", "q_proj", "v_proj"), "opt": ("q_proj", "v_proj"),
    "gptj": ("q_proj", "v_proj"), "gpt_neox": ("query_key_value",), "gpt_neo": ("q_proj", "v_proj"),
    "bert": ("query", "value"), "roberta": ("query", "value"), "xlm-roberta": ("query", "value"),
    "electra": ("query", "value"), "deberta-v2": ("query_proj", "value_proj"), "deberta": ("in_proj",),
    "layoutlm": ("query", "value"), "llama": ("q_proj", "v_proj"), "llama4": ("q_proj", "v_proj"),
    "chatglm": ("query_key_value",), "gpt_bigcode": ("c_attn",), "mpt": ("Wqkv",),
    "RefinedWebModel": ("query_key_value",), "RefinedWeb": ("query_key_value",), "falcon": ("query_key_value",),
    "btlm": ("c_proj", "c_attn"), "codegen": ("qkv_proj",), "mistral": ("q_proj", "v_proj"),
    "mixtral": ("q_proj", "v_proj"), "stablelm": ("q_proj", "v_proj"), "phi": ("q_proj", "v_proj", "fc1", "fc2"),
    "gemma": ("q_proj", "v_proj"), "gemma2": ("q_proj", "v_proj"), "gemma3_text": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"), "qwen3": ("q_proj", "v_proj"),
    "nemotron_h": ("q_proj", "k_proj", "v_proj", "o_proj"), "rwkv": ("key", "value", "receptance", "output"),
    "rwkv7": ("r_proj", "k_proj", "v_proj", "o_proj", "key", "value"),
}

NF4_BLOCK = 64  # weights per absmax (bitsandbytes blocksize for 4-bit)
DQ_BLOCK = 256  # absmax values per second-level fp32 constant
NF4_CODE_BYTES = 16 * 4  # the 16-entry NF4 code book, fp32
DQ_CONST_BYTES = 256 * 4 + 4  # the 8-bit dynamic code book (fp32) and the absmax offset (fp32)


def total_params(card: ModelCard) -> int:
    """Parameters of the transformers model built from the card (tied weights counted once)."""
    lay = layout(card)
    head = 0 if lay.head_tied else lay.head_rows * lay.head_cols
    return (
        card.n_layers * block_params(card)
        + sum(e.numel for e in lay.embeddings)
        + sum(x.numel for x in lay.other_linears)
        + sum(n.numel for n in lay.other_norms)
        + sum(p.numel for p in lay.other_params)
        + head
        + lay.head_bias
    )


def active_params(card: ModelCard) -> int:
    """Parameters one token passes through: the total less the (E − k)/E share of every routed-expert tensor.

    Expert tensors are the parameters under an `experts` module (fused (E, ·, ·) weights, or one Linear per
    expert), shared experts excluded. Equals total_params for a dense model. Mixtral-8x7B: 12.9B of 46.7B
    (Jiang et al. 2024, §2.1).
    """
    E, k = card.n_experts, card.experts_per_token
    if not E:
        return total_params(card)
    lay = layout(card)
    expert = sum(p.numel for p in lay.block_params if p.expert) * card.n_layers
    expert += sum(p.numel for p in lay.other_params if p.expert)
    is_expert = lambda name: ".experts." in f".{name}" and "shared_expert" not in name  # noqa: E731
    expert += card.n_layers * sum(x.numel for x in lay.block_linears if is_expert(x.name))
    expert += sum(x.numel for x in lay.other_linears if is_expert(x.name))
    return total_params(card) - expert * (E - k) // E


def nf4_bytes(n: int, double_quant: bool = True) -> int:
    """Bytes bitsandbytes stores for one NF4-quantized weight of n elements."""
    blocks = math.ceil(n / NF4_BLOCK)
    packed = math.ceil(n / 2)  # two 4-bit codes per byte
    if double_quant:
        absmax = blocks + 4 * math.ceil(blocks / DQ_BLOCK) + DQ_CONST_BYTES  # uint8 absmax + fp32 second level
    else:
        absmax = 4 * blocks  # fp32 absmax
    return packed + absmax + NF4_CODE_BYTES


def nf4_bits_per_weight(double_quant: bool = True) -> float:
    """Asymptotic bits per weight: 4 + 8/64 + 32/(64·256) with double quantization, else 4 + 32/64."""
    return 4 + (8 / NF4_BLOCK + 32 / (NF4_BLOCK * DQ_BLOCK) if double_quant else 32 / NF4_BLOCK)


# ---------------------------------------------------------------- LoRA target matching (peft's rules)


def _all_linears(card: ModelCard) -> list[tuple[str, Linear, bool]]:
    """(full name of block 0 or model-level name, linear, in_block) for every Linear but the output head."""
    lay = layout(card)
    out = [(lay.block_name(0, x.name), x, True) for x in lay.block_linears]
    out += [(x.name, x, False) for x in lay.other_linears]
    return out


def parse_targets(spec: str | None, model_type: str) -> tuple[str, tuple[str, ...]]:
    """("names", names) | ("regex", (pattern,)) | ("all-linear", ()) from the CLI/plan spelling."""
    if spec is None or spec == "":
        if model_type not in DEFAULT_TARGETS:
            raise PlanError(
                f"peft has no default LoRA targets for model type '{model_type}'; pass --targets "
                "(module names, 'all-linear' or 're:REGEX')"
            )
        return "names", DEFAULT_TARGETS[model_type]
    if spec.lower() == "all-linear":
        return "all-linear", ()
    if spec.startswith("re:"):
        try:
            re.compile(spec[3:])
        except re.error as e:
            raise PlanError(f"bad target regex '{spec[3:]}': {e}") from None
        return "regex", (spec[3:],)
    names = tuple(t.strip() for t in spec.split(",") if t.strip())
    if not names:
        raise PlanError(f"no target names in '{spec}'")
    return "names", names


@lru_cache(maxsize=4096)
def lora_targets(card: ModelCard, spec: str | None) -> tuple[tuple[Linear, bool, int], ...]:
    """(linear, in_block, copies wrapped) for each Linear LoRA wraps, as peft would match them.

    peft (tuners_utils.check_target_module_exists): a list matches a module whose full name equals a target
    or ends with "." + target; a string is a regex matched in full; "all-linear" is every Linear/Conv1D
    except the output head. Each block's own names are matched, so a target naming one block
    ('decoder.layers.0.self_attn.q_proj', 're:.*layers\\.[0-3]\\..*q_proj') wraps just those blocks.
    """
    if card.model_type in PEFT_MOE_FAMILY:
        return _moe_targets(card, spec)
    kind, names = parse_targets(spec, card.model_type)
    lay = layout(card)
    if kind == "all-linear":
        chosen = [(lin, True, card.n_layers) for lin in lay.block_linears]
        chosen += [(lin, False, 1) for lin in lay.other_linears]
    else:
        if kind == "regex":
            pat = re.compile(names[0])
            hit = lambda full: pat.fullmatch(full) is not None  # noqa: E731
        else:
            hit = lambda full: any(full == t or full.endswith("." + t) for t in names)  # noqa: E731
        chosen = []
        for lin in lay.block_linears:
            copies = sum(hit(lay.block_name(i, lin.name)) for i in range(card.n_layers))
            if copies:
                chosen.append((lin, True, copies))
        chosen += [(lin, False, 1) for lin in lay.other_linears if hit(lin.name)]
    if not chosen:
        avail = sorted({lin.name.rsplit(".", 1)[-1] for _, lin, _ in _all_linears(card)})
        raise PlanError(
            f"LoRA targets {quote(spec if spec is not None else ','.join(names))} match no Linear of "
            f"{card.name} (candidates: {', '.join(avail)})"
        )
    return tuple(chosen)


@lru_cache(maxsize=1024)
def lora_block_sets(card: ModelCard, spec: str | None) -> tuple[frozenset[str], ...]:
    """Per block i, the names (as in `layout(card).block_linears`) of the Linears LoRA wraps in block i."""
    kind, names = parse_targets(spec, card.model_type)
    lay = layout(card)
    if kind == "all-linear":
        return (frozenset(lin.name for lin in lay.block_linears),) * card.n_layers
    if kind == "regex":
        pat = re.compile(names[0])
        hit = lambda full: pat.fullmatch(full) is not None  # noqa: E731
    else:
        hit = lambda full: any(full == t or full.endswith("." + t) for t in names)  # noqa: E731
    return tuple(frozenset(lin.name for lin in lay.block_linears if hit(lay.block_name(i, lin.name)))
                 for i in range(card.n_layers))


def _moe_targets(card: ModelCard, spec: str | None) -> tuple[tuple[Linear, bool, int], ...]:
    """lora_targets for the MoE types peft rewrites (moe_targets.py). Fused expert parameters come back as
    Linears named after the parameter, sized so that r·(d_in + d_out) is peft's ParamWrapper count."""
    if spec is None or spec == "":
        if card.model_type in DEFAULT_TARGETS:  # peft's rewrite turns the default None into an empty set
            raise PlanError(f"peft 0.21 with transformers 5 targets nothing by default on '{card.model_type}' "
                            "(its MoE rewrite empties the default list); pass --targets")
    kind, names = parse_targets(spec, card.model_type)
    candidates = _all_linears(card)
    leaves = {lin.name.rsplit(".", 1)[-1] for _, lin, _ in candidates}
    modules, params = rewrite(card.model_type, kind, names, leaves)
    chosen = [(lin, b, card.n_layers if b else 1) for name, lin, b in candidates
              if any(name == t or name.endswith("." + t) for t in modules)]
    lay = layout(card)
    loose = [(p, True, lay.block_name(0, p.name)) for p in lay.block_params]
    loose += [(p, False, p.name) for p in lay.other_params]
    for p, in_block, full in loose:
        hit = next((t for t in params if full == t or full.endswith("." + t)), None)
        if hit is not None:
            d_in, d_out = param_lora_shape(p.shape, params[hit])
            chosen.append((Linear(p.name, d_in, d_out, False, "param_lora"), in_block, card.n_layers if in_block else 1))
    if not chosen:
        raise PlanError(f"LoRA targets '{spec}' match no Linear or parameter of {card.name}")
    return tuple(chosen)


# ---------------------------------------------------------------- per-method counts


@dataclass(frozen=True)
class ParamCounts:
    base: int  # parameters of the pretrained model
    added: int  # LoRA or adapter parameters added by the method
    trainable: int
    frozen: int
    quantized: int  # frozen base weights stored in NF4 (QLoRA), a subset of `frozen`
    quantized_tensors: int
    targets: tuple[str, ...]  # module names wrapped by LoRA / where adapters sit / trained blocks

    @property
    def total(self) -> int:
        return self.base + self.added

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.total


def lora_params(d_in: int, d_out: int, r: int) -> int:
    """r·(d_in + d_out): A is r×d_in, B is d_out×r."""
    return r * (d_in + d_out)


def adapter_params(d: int, m: int) -> int:
    """2md + d + m: down-projection (m×d + m) and up-projection (d×m + d)."""
    return 2 * m * d + d + m


def adapters_per_block(placement: str) -> int:
    return 2 if placement == "houlsby" else 1


def norm_params(card: ModelCard) -> int:
    lay = layout(card)
    return card.n_layers * sum(n.numel for n in lay.block_norms) + sum(n.numel for n in lay.other_norms)


def block_params(card: ModelCard) -> int:
    """Parameters of one block (those every block has; see cardgen for blocks that differ)."""
    lay = layout(card)
    return (sum(x.numel for x in lay.block_linears) + sum(n.numel for n in lay.block_norms)
            + sum(p.numel for p in lay.block_params))


def quantizable(card: ModelCard) -> list[tuple[Linear, int]]:
    """(Linear, how many) for every Linear QLoRA stores in NF4: all but the output head."""
    lay = layout(card)
    keep = seq2seq.kept_in_fp32(card)  # left unquantized by a 4-bit load (T5's wo)
    return ([(x, card.n_layers) for x in lay.block_linears if x.name.rsplit(".", 1)[-1] not in keep]
            + [(x, 1) for x in lay.other_linears if x.name.rsplit(".", 1)[-1] not in keep])


_COUNTS: dict[tuple, "ParamCounts"] = {}


def count(card: ModelCard, plan: Plan) -> ParamCounts:
    """Parameters by role; independent of the step's shape, so cached without it."""
    key = (card, plan.method, plan.r, plan.targets, plan.adapter_size, plan.adapter_placement, plan.top_k)
    p = _COUNTS.get(key)
    if p is None:
        if len(_COUNTS) > 65536:
            _COUNTS.clear()
        p = _COUNTS[key] = _count(card, plan)
    return p


def _count(card: ModelCard, plan: Plan) -> ParamCounts:
    base = total_params(card)
    L = card.n_layers
    if plan.method == "full":
        return ParamCounts(base, 0, base, 0, 0, 0, ("*",))
    if plan.method == "top":
        if plan.top_k > L:
            raise PlanError(f"top-k {plan.top_k} exceeds the {L} blocks of {card.name}")
        trainable = plan.top_k * block_params(card)
        names = tuple(f"{layout(card).block_prefix}.{i}" for i in range(L - plan.top_k, L))
        return ParamCounts(base, 0, trainable, base - trainable, 0, 0, names)
    if plan.method == "adapter":
        if plan.adapter_size > card.d_model:
            raise PlanError(f"adapter size {plan.adapter_size} exceeds the hidden size d = {card.d_model}")
        added = L * adapters_per_block(plan.adapter_placement) * adapter_params(card.d_model, plan.adapter_size)
        norms = norm_params(card)
        names = ("adapter_attn", "adapter_ffn") if plan.adapter_placement == "houlsby" else ("adapter_ffn",)
        return ParamCounts(base, added, added + norms, base - norms, 0, 0, names)
    # lora / qlora
    targets = lora_targets(card, plan.targets)
    added = 0
    for lin, _, copies in targets:
        if plan.r > min(lin.d_in, lin.d_out) and lin.role not in ("router", "param_lora"):
            raise PlanError(f"LoRA rank r = {plan.r} exceeds the smaller side of {lin.name} "
                            f"({lin.d_in}×{lin.d_out})")
        added += copies * lora_params(lin.d_in, lin.d_out, plan.r)
    quantized = tensors = 0
    if plan.method == "qlora":
        for lin, n in quantizable(card):
            quantized += n * lin.weight_numel
            tensors += n
    return ParamCounts(base, added, added, base, quantized, tensors, tuple(lin.name for lin, _, _ in targets))


def qlora_weight_bytes(card: ModelCard, double_quant: bool = True) -> int:
    """Bytes of every NF4 weight with its quantization constants, tensor by tensor."""
    return sum(n * nf4_bytes(lin.weight_numel, double_quant) for lin, n in quantizable(card))
