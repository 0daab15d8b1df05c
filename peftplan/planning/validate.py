"""One validation layer for everything a user hands the planner: Plan fields, CLI-only numbers, config.json
dicts and model cards. Types, finiteness, ranges with a physical meaning, divisibility and size bounds.

Used by `Plan.__post_init__` (so the CLI, the Python API and grid files get the same check), by
`cards.card_from_hf_config` (the raw config dict, before anything is computed from it) and by
`ModelCard.__post_init__` (TOML cards). Every failure is a `PlanError` subclass with a one-line message
(peftplan/errors.py). Pure Python: no torch.

Size bounds (documented in the README): they are far above every real model and step, and keep the
planner's per-layer lists and Python integers small enough to answer in milliseconds.

    batch_size ≤ 2^20, seq_len ≤ 2^24, r ≤ 2^16, adapter_size ≤ 2^17, top_k ≤ 2^16
    hidden ≤ 2^17, layers ≤ 2,048, heads ≤ 2^12, head_dim ≤ 2^14, FFN ≤ 2^20, vocab ≤ 2^24, positions ≤ 2^24
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from peftplan.errors import ConfigError, PlanValueError, quote

# ---------------------------------------------------------------- primitive checks


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_int(v: Any, what: str, lo: int, hi: int, err: type = PlanValueError) -> int:
    """`v` as an int in [lo, hi]; an integral float (4096.0) is accepted, 64.5 / NaN / "8" / True are not."""
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        v = int(v)
    if not is_int(v):
        raise err(f"{what} must be a whole number, got {quote(v)}")
    if v < lo and lo == 1:
        raise err(f"{what} must be positive, got {quote(v)}")
    if not lo <= v <= hi:
        raise err(f"{what} must be in [{lo:,}, {hi:,}], got {quote(v)}")
    return v


def check_float(v: Any, what: str, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False,
                err: type = PlanValueError) -> float:
    """`v` as a finite float in the range (open or closed at each end)."""
    if not is_number(v):
        raise err(f"{what} must be a number, got {quote(v)}")
    if not math.isfinite(v):
        raise err(f"{what} must be finite, got {v}")
    below = v <= lo if lo_open else v < lo
    above = v >= hi if hi_open else v > hi
    if below or above:
        rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise err(f"{what} must be in {rng}, got {v:g}")
    return float(v)


def check_choice(v: Any, what: str, choices: tuple[str, ...], err: type = PlanValueError) -> str:
    if not isinstance(v, str) or v not in choices:
        raise err(f"unknown {what} {quote(v)} (choose from {', '.join(choices)})")
    return v


def check_bool(v: Any, what: str, err: type = PlanValueError) -> bool:
    if not isinstance(v, bool):
        raise err(f"{what} must be true or false, got {quote(v)}")
    return v


# ---------------------------------------------------------------- Plan fields (one row per field)


@dataclass(frozen=True)
class Field:
    """How one Plan field is checked: kind 'int' | 'float' | 'choice' | 'bool' | 'targets', its range or
    choices, and the words used in messages."""
    kind: str
    what: str
    lo: float = 0
    hi: float = 0
    choices: tuple[str, ...] = ()
    lo_open: bool = False
    hi_open: bool = False


MAX_BATCH = 2**20
MAX_SEQ = 2**24
MAX_RANK = 2**16
MAX_ADAPTER = 2**17
MAX_TOP_K = 2**16
MAX_TARGETS_CHARS = 4096
MAX_TOKENS = 10**18  # tokens of data for the cost figure (a thousand times any published pre-training run)


def plan_table() -> dict[str, Field]:
    """Field name -> check. Adding a Plan option is one row here (a test asserts every Plan field has one)."""
    from peftplan.plan import (ATTENTIONS, AUTOCASTS, DTYPES, METHODS, MOE_ROUTINGS, OFFLOADS, OPTIMIZERS, PLACEMENTS,
                               STRATEGIES)

    return {
        "method": Field("choice", "method", choices=METHODS),
        "r": Field("int", "LoRA rank r", 1, MAX_RANK),
        "alpha": Field("float", "LoRA alpha", 0, 1e6, lo_open=True),
        "dropout": Field("float", "LoRA dropout", 0, 1, hi_open=True),
        "targets": Field("targets", "LoRA targets"),
        "double_quant": Field("bool", "double_quant"),
        "kbit_prep": Field("bool", "kbit_prep"),
        "adapter_size": Field("int", "adapter size", 1, MAX_ADAPTER),
        "adapter_placement": Field("choice", "adapter placement", choices=PLACEMENTS),
        "top_k": Field("int", "top-k", 1, MAX_TOP_K),
        "batch_size": Field("int", "batch size", 1, MAX_BATCH),
        "seq_len": Field("int", "sequence length", 1, MAX_SEQ),
        "dtype": Field("choice", "dtype", choices=tuple(DTYPES)),
        "optimizer": Field("choice", "optimizer", choices=OPTIMIZERS),
        "foreach": Field("bool", "foreach"),
        "grad_checkpointing": Field("bool", "grad_checkpointing"),
        "attention": Field("choice", "attention", choices=ATTENTIONS),
        # the stack users run (peft, the HF Trainer)
        "adapter_dtype": Field("choice", "adapter dtype", choices=tuple(DTYPES)),
        "use_dora": Field("bool", "use_dora"),
        "autocast": Field("choice", "autocast", choices=AUTOCASTS),
        "grad_accum": Field("int", "gradient accumulation steps", 1, 2**16),
        "max_grad_norm": Field("float", "max grad norm", 0, 1e6),
        "use_reentrant": Field("bool", "use_reentrant"),
        "moe_routing": Field("choice", "MoE routing", choices=MOE_ROUTINGS),
        "logits_shift_copy": Field("bool", "logits_shift_copy"),
        # past one GPU
        "gpus": Field("int", "--gpus", 1, 2**16),
        "nodes": Field("int", "--nodes", 1, 2**12),
        "strategy": Field("choice", "strategy", choices=STRATEGIES),
        "offload": Field("choice", "offload", choices=OFFLOADS),
        "reduce_bucket_size": Field("int", "reduce_bucket_size", 0, 2**40),
        "allgather_bucket_size": Field("int", "allgather_bucket_size", 0, 2**40),
        "stage3_prefetch_bucket_size": Field("int", "stage3_prefetch_bucket_size", 0, 2**40),
        "stage3_max_live_parameters": Field("int", "stage3_max_live_parameters", 0, 2**44),
    }


def check_relations(plan: Any) -> None:
    """Choices that are valid alone but contradict each other. Raises PlanValueError."""
    from peftplan.plan import DTYPES

    lora = plan.method in ("lora", "qlora")
    # autocast lowers fp32 ops to one half type; weights loaded in the other half type would run every matmul
    # with mismatched operands
    if plan.autocast != "none" and plan.dtype not in ("fp32", plan.autocast):
        raise PlanValueError(f"autocast {plan.autocast} over {plan.dtype} weights: load the weights in fp32 "
                             f"(mixed precision) or in {plan.autocast}")
    if lora and DTYPES[plan.adapter_dtype] < DTYPES[plan.dtype]:
        raise PlanValueError(f"adapter dtype {plan.adapter_dtype} is narrower than the {plan.dtype} weights "
                             "(peft only upcasts adapters)")
    if lora and plan.adapter_dtype != plan.dtype and DTYPES[plan.adapter_dtype] == 2:
        raise PlanValueError(f"adapter dtype {plan.adapter_dtype} over {plan.dtype} weights: peft keeps adapters "
                             "in the base dtype or fp32")
    trained = plan.adapter_dtype if lora else plan.dtype
    if plan.autocast == "fp16" and trained == "fp16":
        raise PlanValueError("fp16 autocast with fp16 trainable weights: the GradScaler refuses to unscale fp16 "
                             "gradients (load the weights in fp32, or keep LoRA adapters in fp32)")
    if plan.use_dora and not lora:
        raise PlanValueError("--dora applies to LoRA and QLoRA only")
    if plan.gpus % plan.nodes:
        raise PlanValueError(f"--nodes {plan.nodes} does not divide --gpus {plan.gpus}")


def check_field(f: Field, v: Any) -> None:
    """Raise PlanValueError when `v` does not pass the row `f`."""
    if f.kind == "int":
        if not is_int(v):  # a Plan holds ints; integral floats are for config files
            raise PlanValueError(f"{f.what} must be a whole number, got {quote(v)}")
        check_int(v, f.what, int(f.lo), int(f.hi))
    elif f.kind == "float":
        check_float(v, f.what, f.lo, f.hi, f.lo_open, f.hi_open)
    elif f.kind == "choice":
        check_choice(v, f.what, f.choices)
    elif f.kind == "bool":
        check_bool(v, f.what)
    elif f.kind == "targets":
        check_targets(v)
    else:  # pragma: no cover - a table typo
        raise AssertionError(f.kind)


def _accepts(f: Field):
    """A fast predicate for the common, valid value (the planner builds thousands of Plans in a fit search);
    anything it does not accept goes through `check_field` for the message."""
    if f.kind == "int":
        lo, hi = int(f.lo), int(f.hi)
        return lambda v: type(v) is int and lo <= v <= hi
    if f.kind == "float":
        lo, hi, lo_open, hi_open = f.lo, f.hi, f.lo_open, f.hi_open
        return lambda v: (type(v) is float or type(v) is int) and (lo < v if lo_open else lo <= v) and \
            (v < hi if hi_open else v <= hi)
    if f.kind == "choice":
        choices = frozenset(f.choices)
        return lambda v: type(v) is str and v in choices
    if f.kind == "bool":
        return lambda v: v is True or v is False
    return lambda v: v is None


_COMPILED: tuple | None = None


def validate_plan(plan: Any) -> None:
    """Check every field of a Plan against `plan_table()`.

    Raises PlanValueError naming the field, its value (quoted, cut to 60 characters) and the allowed range.
    """
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = tuple((name, f, _accepts(f)) for name, f in plan_table().items())
    values = plan.__dict__
    for name, f, ok in _COMPILED:
        v = values[name]
        if not ok(v):
            check_field(f, v)
    check_relations(plan)


def check_targets(spec: Any) -> None:
    """peft's `target_modules` spellings: None (the model type's defaults), 'all-linear' (alone), 're:REGEX'
    (a regex peft matches in full), or comma-separated module names / dotted name suffixes."""
    if spec is None:
        return
    if not isinstance(spec, str):
        raise PlanValueError(f"LoRA targets must be text, got {quote(spec)}")
    if len(spec) > MAX_TARGETS_CHARS:
        raise PlanValueError(f"LoRA targets are {len(spec):,} characters long (at most {MAX_TARGETS_CHARS:,})")
    if spec.startswith("re:"):
        try:
            re.compile(spec[3:])
        except (re.error, RecursionError, OverflowError) as e:
            raise PlanValueError(f"bad target regex {quote(spec[3:])}: {e}") from None
        return
    names = [t.strip() for t in spec.split(",")]
    if spec.strip().lower() == "all-linear":
        return
    if any(n.lower() == "all-linear" for n in names):
        raise PlanValueError(f"'all-linear' cannot be combined with module names (got {quote(spec)})")
    if not any(names):
        raise PlanValueError(f"no target names in {quote(spec)}")
    bad = next((n for n in names if not n or not re.fullmatch(r"[A-Za-z0-9_.\-]+", n)), None)
    if bad is not None:
        raise PlanValueError(f"bad LoRA target name {quote(bad)} in {quote(spec)}: module names are letters, "
                             "digits, '_', '-' and '.' (use 're:REGEX' for a pattern)")


def check_tokens(tokens: Any) -> int:
    """Tokens of data for GPU-hours and cost: a whole, finite number in [0, 10^18]. A float from the command
    line (1e8) is accepted when it is integral."""
    if isinstance(tokens, float) and math.isfinite(tokens) and tokens.is_integer():
        tokens = int(tokens)
    if not is_int(tokens):
        raise PlanValueError(f"tokens must be a whole, finite number, got {quote(tokens)}")
    if not 0 <= tokens <= MAX_TOKENS:
        raise PlanValueError(f"tokens must be in [0, 1e18], got {tokens:.3g}")
    return tokens


# ---------------------------------------------------------------- config.json and model cards

MAX_LAYERS = 2048
# config.json integer fields across the supported families: (lowest, highest)
CONFIG_INTS: dict[str, tuple[int, int]] = {
    "hidden_size": (1, 2**17), "n_embd": (1, 2**17),
    "num_hidden_layers": (1, MAX_LAYERS), "n_layer": (1, MAX_LAYERS),
    "num_attention_heads": (1, 2**12), "n_head": (1, 2**12), "num_key_value_heads": (1, 2**12),
    "head_dim": (1, 2**14),
    "intermediate_size": (1, 2**20), "ffn_dim": (1, 2**20), "n_inner": (1, 2**20),
    "vocab_size": (1, 2**24),
    "max_position_embeddings": (1, 2**24), "n_positions": (1, 2**24),
    "word_embed_proj_dim": (1, 2**17), "type_vocab_size": (0, 2**16),
    "sliding_window": (1, 2**24),
}
CONFIG_PROBS = ("attention_dropout", "resid_pdrop", "attn_pdrop", "embd_pdrop", "hidden_dropout_prob",
                "attention_probs_dropout_prob", "dropout")
CONFIG_BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "enable_bias", "do_layer_norm_before",
                "_remove_final_layer_norm")
CONFIG_POSITIVE = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "rope_theta", "query_pre_attn_scalar",
                   "attn_logit_softcapping", "final_logit_softcapping")
CONFIG_ACTIVATIONS = ("hidden_act", "activation_function", "hidden_activation")
CONFIG_DICTS = ("rope_scaling", "rope_parameters")
# transformers.activations.ACT2CLS keys (transformers 5.24; a test holds this list to the installed one)
ACTIVATIONS = ("gelu", "gelu_10", "gelu_accurate", "gelu_fast", "gelu_new", "gelu_python", "gelu_python_tanh",
               "gelu_pytorch_tanh", "hardswish", "laplace", "leaky_relu", "linear", "mish", "prelu", "quick_gelu",
               "relu", "relu2", "relu6", "sigmoid", "silu", "sqrtsoftplus", "swish", "tanh", "xielu")
MAX_NAME_CHARS = 200


def validate_config(config: Mapping[str, Any]) -> None:
    """Check a raw transformers config dict before a card is read from it (config.json on disk).

    Absent or null fields are left to the reader's defaults; present ones must have the right type and a
    value the model can have: whole sizes in their bounds, probabilities in [0, 1], real booleans, known
    activation names (transformers' ACT2CLS), positive finite epsilons and scales, heads dividing the hidden
    size and kv heads dividing the heads (transformers' `validate_architecture` and attention modules).

    Raises ConfigError (one line, naming the field).
    """
    if not isinstance(config, Mapping):
        raise ConfigError(f"a config must be a JSON object, got {type(config).__name__}")
    mt = config.get("model_type")
    if mt is not None and not isinstance(mt, str):
        raise ConfigError(f"config.json field 'model_type' must be text, got {quote(mt)}")
    for key, (lo, hi) in CONFIG_INTS.items():
        if config.get(key) is not None:
            check_int(config[key], f"config.json field '{key}'", lo, hi, err=ConfigError)
    for key in CONFIG_PROBS:
        if config.get(key) is not None:
            check_float(config[key], f"config.json field '{key}' (a probability)", 0.0, 1.0, err=ConfigError)
    for key in CONFIG_BOOLS:
        if config.get(key) is not None:
            check_bool(config[key], f"config.json field '{key}'", err=ConfigError)
    for key in CONFIG_POSITIVE:
        if config.get(key) is not None:
            check_float(config[key], f"config.json field '{key}'", 0.0, 1e30, lo_open=True, err=ConfigError)
    for key in CONFIG_ACTIVATIONS:
        if config.get(key) is not None:
            act = config[key]
            if isinstance(act, str) and act.startswith("gated-"):  # T5's feed_forward_proj spelling: gated-gelu
                act = act[len("gated-"):]
            check_choice(act, f"activation in config.json field '{key}'", ACTIVATIONS, err=ConfigError)
    for key in CONFIG_DICTS:
        if config.get(key) is not None and not isinstance(config[key], Mapping):
            raise ConfigError(f"config.json field '{key}' must be an object or null, got {quote(config[key])}")
    name = config.get("_name_or_path")
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"config.json field '_name_or_path' must be text, got {quote(name)}")
    d = _first(config, "hidden_size", "n_embd")
    h = _first(config, "num_attention_heads", "n_head")
    kv = config.get("num_key_value_heads")
    if d is not None and h is not None and int(d) % int(h):
        raise ConfigError(f"config.json: hidden size {int(d)} is not a multiple of the {int(h)} attention heads")
    if h is not None and kv is not None and int(h) % int(kv):
        raise ConfigError(f"config.json: {int(h)} attention heads are not a multiple of the {int(kv)} kv heads")


def _first(config: Mapping[str, Any], *keys: str):
    return next((config[k] for k in keys if config.get(k) is not None), None)


CARD_INTS: dict[str, tuple[int, int]] = {
    "d_model": (1, 2**17), "n_layers": (1, MAX_LAYERS), "n_heads": (1, 2**12), "n_kv_heads": (1, 2**12),
    "head_dim": (1, 2**14), "d_ff": (1, 2**20), "vocab_size": (1, 2**24), "max_positions": (1, 2**24),
    "position_offset": (0, 2**16), "embed_proj_dim": (0, 2**17), "type_vocab_size": (0, 2**16),
    # mixture of experts (0: dense)
    "n_experts": (0, 2**16), "experts_per_token": (0, 2**16), "expert_d_ff": (0, 2**20), "n_shared_experts": (0, 2**10),
}
CARD_BOOLS = ("gated_mlp", "tie_embeddings", "attention_bias", "attention_out_bias", "mlp_bias", "final_norm",
              "sandwich_norms", "qk_norm", "cross_attention", "parallel_block", "router_norm_topk",
              "router_weights_fp32", "router_aux_loss", "generated", "text_only")
CARD_PROBS = ("hidden_dropout", "attention_dropout", "embed_dropout")


def validate_card(card: Any) -> None:
    """Check a ModelCard's fields (TOML cards and cards read from config.json alike).

    Raises ConfigError naming the card and the field.
    """
    who = f"model card {quote(card.name) if isinstance(card.name, str) else '?'}"
    for key in ("name", "source", "model_type", "activation", "norm", "positions"):
        if not isinstance(getattr(card, key), str):
            raise ConfigError(f"{who}: {key} must be text, got {quote(getattr(card, key))}")
    generated = bool(getattr(card, "generated", False))
    for key, (lo, hi) in CARD_INTS.items():
        v = getattr(card, key)
        if generated and key == "max_positions":
            lo = 0  # relative positions (T5) have no table and no limit: the generator records 0
        if not is_int(v):
            raise ConfigError(f"{who}: {key} must be a whole number, got {quote(v)}")
        check_int(v, f"{who}: {key}", lo, hi, err=ConfigError)
    for key in CARD_BOOLS:
        check_bool(getattr(card, key), f"{who}: {key}", err=ConfigError)
    for key in CARD_PROBS:
        check_float(getattr(card, key), f"{who}: {key}", 0.0, 1.0, err=ConfigError)
    check_choice(card.norm, f"norm of {who}", ("layernorm", "rmsnorm"), err=ConfigError)
    check_choice(card.positions, f"positions of {who}", ("learned", "rotary", "relative", "alibi"), err=ConfigError)
    if card.experts_per_token > card.n_experts:
        raise ConfigError(f"{who}: experts_per_token {card.experts_per_token} exceeds n_experts {card.n_experts}")
    if card.n_heads % card.n_kv_heads:
        raise ConfigError(f"{who}: n_heads {card.n_heads} is not a multiple of n_kv_heads {card.n_kv_heads}")
    if not isinstance(card.hf, dict):
        raise ConfigError(f"{who}: hf must be a table")


# ---------------------------------------------------------------- bounded work (refused past a bound unless --yes)

TRACE_OPS_PER_BLOCK = 800  # ops one block records per training step (measured: OPT ~530, Llama ~780)
TRACE_OPS_FIXED = 300  # embeddings, head, loss and optimizer set-up per step
MAX_TRACE_OPS = 250_000  # about 45 s of fake-tensor tracing on 2 CPU cores (~6,000 ops/s)
MAX_CHECK_CONFIGS = 512  # configurations in one `check` grid
MAX_GRID_POINTS = 1_000  # points in one `profile` grid


def predicted_trace_ops(n_layers: int, steps: int) -> int:
    """Ops the fake-tensor trace records: steps · (800 · L + 300) (an upper bound of the measured counts)."""
    return steps * (TRACE_OPS_PER_BLOCK * n_layers + TRACE_OPS_FIXED)


def check_work(what: str, amount: int, bound: int, yes: bool) -> None:
    """Refuse work past a documented bound unless the user said `--yes`.

    Raises WorkTooLargeError: '<what> is N, past the bound of B; pass --yes to run it anyway'.
    """
    from peftplan.errors import WorkTooLargeError

    if amount > bound and not yes:
        raise WorkTooLargeError(f"{what} is {amount:,}, past the bound of {bound:,}; pass --yes to run it anyway")
