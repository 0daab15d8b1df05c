"""Generated model cards: any config.json transformers can build, read from the real module tree on meta.

    generate(config, name, source, task, text_only)   card fields (a dict ready for `ModelCard(**fields)`)
    card_toml(fields)                                  the card as TOML text, the format of profiles/models/

How: `AutoConfig.for_model(model_type, **config)` (never `from_pretrained`: nothing is downloaded and no
`auto_map` code runs), then the task's Auto class `.from_config` under `torch.device("meta")` (tied weights stay
tied, NOTES.md), then one walk of `named_modules()`. A module is a Linear when peft's all-linear would take it
(`torch.nn.Linear` or transformers' `Conv1D`, peft/tuners/tuners_utils.py `_maybe_include_all_linear_layers`),
an embedding when it is an `nn.Embedding`, a norm when its class name says so and it holds only 1-D weight/bias;
every other parameter (fused 3-D expert weights, routers that are not Linear, attention sinks, convolutions)
is kept as a plain parameter with its shape, so totals stay exact whatever the family.

Blocks: the repeated layer list is the `nn.ModuleList` holding the most parameters (the text decoder, or the
T5 decoder). A parameter present, with one shape, in every block of that list is a block parameter (counted L
times); anything else, including blocks that differ (DeepSeek-V2's dense first layer, interleaved MoE layers),
is listed by full name among the model-level parameters. Block Linears get a ROLE read from their module path
(`ROLES` below), which the memory model reads instead of the model type.

This module imports torch and transformers (inside the functions); the planning tier only calls it, lazily,
on a cache miss (peftplan/planning/cards.py).
"""
from __future__ import annotations

import copy
import json
import re

from peftplan.errors import PlanError

TASKS = ("causal-lm", "masked-lm", "seq2seq-lm", "image-text-to-text", "classification")

# Leaf module names by role, inside attention modules (path has "attn"/"attention") and elsewhere (FFN).
_ATTN_IN = {"q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "c_attn", "wqkv", "query", "key", "value",
            "q", "k", "v", "q_a_proj", "kv_a_proj_with_mqa", "in_proj", "query_proj", "key_proj", "value_proj"}
_ATTN_LATENT = {"q_b_proj", "kv_b_proj"}  # MLA: read the latent norms' outputs, not the block input
_ATTN_OUT = {"o_proj", "out_proj", "o", "wo", "c_proj", "dense"}
_FFN_IN = {"gate_proj", "up_proj", "gate_up_proj", "fc1", "c_fc", "wi", "wi_0", "wi_1", "dense_h_to_4h", "w1",
           "w3", "fc_in", "input_linear"}
_FFN_OUT = {"down_proj", "fc2", "c_proj", "wo", "dense_4h_to_h", "w2", "fc_out", "output_linear"}
_ROUTER = {"gate", "router", "classifier"}
ROLES = ("attn_in", "attn_latent", "attn_out", "cross_attn_in", "cross_attn_out", "ffn_in", "ffn_out", "router",
         "expert_ffn_in", "expert_ffn_out", "shared_ffn_in", "shared_ffn_out", "other")


def role_of(rel: str) -> str:
    """Role of a block Linear from its path relative to the block, e.g. 'self_attn.q_proj' -> 'attn_in'.

    BERT-style paths name the FFN by their parents: 'intermediate.dense' reads the block's attention output
    (ffn_in), 'output.dense' writes the block output (ffn_out), 'attention.output.dense' is attn_out.
    """
    parts = rel.split(".")
    leaf = parts[-1].lower()
    path = rel.lower()
    in_attn = any(("attn" in p or "attention" in p) for p in path.split(".")[:-1])
    if in_attn:
        cross = "encdec" in path or "cross" in path
        if leaf in _ATTN_LATENT:
            return "attn_latent"
        if leaf in _ATTN_IN:
            return "cross_attn_in" if cross else "attn_in"
        if leaf in _ATTN_OUT or path.endswith("output.dense"):
            return "cross_attn_out" if cross else "attn_out"
        return "other"
    if parts[-2:] == ["intermediate", "dense"]:
        return "ffn_in"
    if parts[-2:] == ["output", "dense"]:
        return "ffn_out"
    prefix = "shared_" if "shared_expert" in path else "expert_" if ".experts." in f".{path}" else ""
    if leaf in _ROUTER and not prefix:
        return "router"
    if leaf in _FFN_IN:
        return prefix + "ffn_in"
    if leaf in _FFN_OUT:
        return prefix + "ffn_out"
    return "other"


def param_role(rel: str) -> str:
    """Role of a bare block parameter: 'expert' (routed experts' fused weights), 'shared_expert', 'router'
    (a router that is not a Linear, e.g. Mixtral's `mlp.gate.weight`), 'sink' (gpt-oss attention sinks), 'other'."""
    path = f".{rel.lower()}"
    module = path.rsplit(".", 2)[-2] if path.count(".") >= 2 else ""
    if "shared_expert" in path:
        return "shared_expert"
    if ".experts." in path:
        return "expert"
    if module in _ROUTER or module.endswith("router"):
        return "router"
    if path.endswith(".sinks"):
        return "sink"
    return "other"


# ---------------------------------------------------------------- config checks (before any torch import)


# Size fields that must not be negative (-1 is a sentinel elsewhere, e.g. DeBERTa's max_relative_positions).
_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "vocab_size", "head_dim", "d_model", "d_ff", "d_kv", "n_embd", "n_layer", "n_head", "n_inner",
          "num_layers", "num_heads", "num_decoder_layers", "ffn_dim", "moe_intermediate_size",
          "num_local_experts", "num_experts", "num_experts_per_tok", "n_routed_experts", "n_shared_experts",
          "max_position_embeddings", "n_positions")


def check_config(config: dict) -> str:
    """The model type, after refusing what peftplan will not build. Raises PlanError (one line).

    Refused: no model_type; an `auto_map` or `trust_remote_code` (the model needs downloaded code, which
    peftplan never runs); negative sizes or zero layers; heads that do not divide the hidden size when the
    config gives no head_dim; query heads not a multiple of kv heads.
    """
    mt = config.get("model_type")
    if not isinstance(mt, str) or not mt:
        raise PlanError("config.json has no 'model_type'")
    if (config.get("auto_map") or config.get("trust_remote_code")) and not _native(mt):
        raise PlanError(f"model type '{mt}' needs its own code (auto_map in config.json); "
                        "peftplan never runs downloaded code")
    for sub in _configs(config):
        _check_sizes(sub, mt)
    return mt


def _native(model_type: str) -> bool:
    """Whether the installed transformers has its own classes for the model type (then an auto_map, as
    DeepSeek-V2's config.json still carries, is not needed and is ignored)."""
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    except ImportError:
        return False
    return model_type in CONFIG_MAPPING_NAMES


def _configs(config: dict) -> list[dict]:
    out = [config]
    for key in ("text_config", "vision_config", "encoder", "decoder"):
        if isinstance(config.get(key), dict):
            out.append(config[key])
    return out


def _check_sizes(c: dict, mt: str) -> None:
    for key, value in c.items():
        if key in _SIZES and isinstance(value, int) and not isinstance(value, bool) and value < 0:
            raise PlanError(f"config.json of '{mt}': '{key}' is negative ({value})")
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if c.get(key) == 0:
            raise PlanError(f"config.json of '{mt}': '{key}' is 0 (a model needs at least one layer)")
    d = c.get("hidden_size", c.get("n_embd", c.get("d_model")))
    h = c.get("num_attention_heads", c.get("n_head", c.get("num_heads")))
    kv = c.get("num_key_value_heads")
    if isinstance(h, int) and h == 0:
        raise PlanError(f"config.json of '{mt}': the number of attention heads is 0")
    if isinstance(d, int) and isinstance(h, int) and h > 0 and not c.get("head_dim") and not c.get("d_kv") \
            and d % h:
        raise PlanError(f"config.json of '{mt}': {h} attention heads do not divide the hidden size {d}")
    if isinstance(h, int) and isinstance(kv, int) and kv > 0 and h % kv:
        raise PlanError(f"config.json of '{mt}': {h} query heads are not a multiple of {kv} key/value heads")


# ---------------------------------------------------------------- building on meta


def _auto_class(config, task: str | None, text_only: bool):
    """(task, Auto class, config to build) for a transformers config object."""
    from transformers import (AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForMaskedLM,
                              AutoModelForSeq2SeqLM, AutoModelForSequenceClassification)
    from transformers.models.auto import modeling_auto as auto

    mt = config.model_type
    multimodal = hasattr(config, "vision_config") and mt in auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    if text_only:
        if not multimodal and getattr(config, "text_config", None) is None:
            raise PlanError(f"--text-only: '{mt}' is not a multimodal config")
        config = config.get_text_config()
        mt = config.model_type
        if mt not in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise PlanError(f"--text-only: transformers has no causal-LM class for the text model '{mt}'")
        return "causal-lm", AutoModelForCausalLM, config
    if task == "classification":
        if mt not in auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
            raise PlanError(f"transformers has no sequence-classification class for '{mt}'")
        return task, AutoModelForSequenceClassification, config
    order = [("image-text-to-text", auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, AutoModelForImageTextToText)]
    order = order if multimodal else []
    order += [("masked-lm", auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES, AutoModelForMaskedLM),  # encoders first:
              ("causal-lm", auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, AutoModelForCausalLM),  # BERT has both
              ("seq2seq-lm", auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES, AutoModelForSeq2SeqLM)]
    for name, mapping, cls in order:
        if (task is None or task == name) and mt in mapping:
            return name, cls, config
    raise PlanError(f"transformers has no {task or 'language-model'} class for model type '{mt}'")


def hf_config_from_dict(config: dict):
    """A transformers config from a config.json dict: `AutoConfig.for_model`, no download, no remote code."""
    from transformers import AutoConfig

    mt = check_config(config)
    fields = {k: v for k, v in config.items() if k not in ("model_type", "auto_map", "transformers_version")}
    try:
        cfg = AutoConfig.for_model(mt, **fields)
    except ValueError as e:
        if "Unrecognized" in str(e) or "model_type" in str(e):
            import transformers

            raise PlanError(f"model type '{mt}' is not known to transformers {transformers.__version__}") from None
        raise PlanError(f"config.json of '{mt}' is inconsistent: {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 -- strict config validation raises several kinds
        raise PlanError(f"config.json of '{mt}' is inconsistent: {_first_line(e)}") from None
    for sub in (cfg, getattr(cfg, "text_config", None)):
        pad = getattr(sub, "pad_token_id", None)
        vocab = getattr(sub, "vocab_size", None)
        if isinstance(pad, int) and isinstance(vocab, int) and not 0 <= pad < vocab:
            sub.pad_token_id = None  # class defaults assume the full vocabulary
    return cfg


def _first_line(e: Exception) -> str:
    """The exception's message as one line of at most 300 characters: its lines joined, so a header that ends
    in ':' keeps the reason below it (transformers' strict config validation: "Class validation error for
    validator 'validate_rope':" then the ValueError)."""
    text = " ".join(line.strip() for line in str(e).strip().splitlines() if line.strip())
    return text[:300] if text else type(e).__name__


def meta_model_from_dict(config: dict, task: str | None = None, text_only: bool = False):
    """(task, model on the meta device) for a config.json dict."""
    import torch

    cfg = hf_config_from_dict(config)
    task, cls, cfg = _auto_class(cfg, task, text_only)
    try:
        with torch.device("meta"):
            model = cls.from_config(cfg)
    except PlanError:
        raise
    except Exception as e:  # noqa: BLE001 -- a contradictory config fails inside the model's __init__
        raise PlanError(f"config.json of '{config.get('model_type')}' cannot be built: {_first_line(e)}") from None
    return task, model


def cut_config(cfg, tree: dict, n_layers: int):
    """The transformers config with only the first `n_layers` blocks of the card's repeated list (a cut card,
    `peftplan trace --n-layers`); the config itself when nothing is cut. An encoder-decoder's list is its
    decoder (`num_decoder_layers`; the encoder stays whole, as the card lists it among the model-level
    parameters); per-layer lists (`layer_types`: sliding-window or full attention per layer) keep their first
    entries, so a cut block is the same block as in the whole model."""
    if not tree or n_layers == tree.get("n_blocks"):
        return cfg
    cfg = copy.deepcopy(cfg)
    if getattr(cfg, "is_encoder_decoder", False) and "decoder" in tree["block_prefix"]:
        cfg.num_decoder_layers = n_layers
    else:
        cfg.num_hidden_layers = n_layers
    n = tree.get("n_blocks")
    for key, value in list(vars(cfg).items()):  # per-layer lists (layer_types, ...): one entry per block
        if isinstance(value, list) and len(value) == n and n > n_layers:
            setattr(cfg, key, value[:n_layers])
    return cfg


# ---------------------------------------------------------------- walking the module tree


def _is_norm(module) -> bool:
    name = type(module).__name__.lower()
    params = dict(module.named_parameters(recurse=False))
    return ("norm" in name) and set(params) <= {"weight", "bias"} and all(p.dim() == 1 for p in params.values())


def _entries(model, prefix_of):
    """One entry per parameter-holding module (or per loose parameter), with its full path."""
    from torch import nn

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        Conv1D = ()  # noqa: N806
    seen: set[int] = set()
    out = []
    for mname, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        fresh = {k: p for k, p in params.items() if id(p) not in seen}
        seen.update(id(p) for p in params.values())
        if not params:
            continue
        if isinstance(module, (nn.Linear, Conv1D)) and "weight" in fresh:
            w = fresh["weight"]
            d_in, d_out = (w.shape[0], w.shape[1]) if isinstance(module, Conv1D) else (w.shape[1], w.shape[0])
            out.append({"name": mname, "kind": "linear", "d_in": int(d_in), "d_out": int(d_out),
                        "bias": "bias" in fresh})
        elif isinstance(module, nn.Embedding) and "weight" in fresh:
            out.append({"name": mname, "kind": "embedding", "rows": int(fresh["weight"].shape[0]),
                        "cols": int(fresh["weight"].shape[1])})
        elif _is_norm(module) and fresh:
            size = int(next(iter(fresh.values())).shape[0])
            out.append({"name": mname, "kind": "norm", "size": size, "bias": "bias" in fresh,
                        "weight": "weight" in fresh})
        else:
            for pname, p in fresh.items():
                out.append({"name": f"{mname}.{pname}" if mname else pname, "kind": "param",
                            "shape": [int(s) for s in p.shape]})
            continue
        if isinstance(module, (nn.Linear, Conv1D)) and set(fresh) - {"weight", "bias"}:
            raise AssertionError(mname)  # pragma: no cover
    return out


def _block_list(model):
    """(prefix, n) of the ModuleList holding the most parameters."""
    from torch import nn

    best, best_n, best_len = None, -1, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and name:
            n = sum(p.numel() for p in module.parameters())
            if n > best_n:
                best, best_n, best_len = name, n, len(module)
    return best, best_len


def _numel(e: dict) -> int:
    k = e["kind"]
    if k == "linear":
        return e["d_in"] * e["d_out"] + (e["d_out"] if e["bias"] else 0)
    if k == "embedding":
        return e["rows"] * e["cols"]
    if k == "norm":
        return e["size"] * (int(e.get("weight", True)) + int(e["bias"]))
    n = 1
    for s in e["shape"]:
        n *= s
    return n


def module_tree(model) -> dict:
    """The facts the planner needs from a built model: blocks, per-block and model-level entries, head, ties."""
    prefix, n_blocks = _block_list(model)
    entries = _entries(model, None)
    per_block: dict[str, dict[int, dict]] = {}
    rest = []
    pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$") if prefix else None
    for e in entries:
        m = pat.match(e["name"]) if pat else None
        if m:
            per_block.setdefault(m.group(2), {})[int(m.group(1))] = e
        else:
            rest.append(e)
    block = []
    for rel, by_index in per_block.items():
        shapes = {json.dumps({k: v for k, v in e.items() if k != "name"}, sort_keys=True) for e in by_index.values()}
        if len(by_index) == n_blocks and len(shapes) == 1:
            e = dict(next(iter(by_index.values())), name=rel)
            if e["kind"] == "linear":
                e["role"] = role_of(rel)
            elif e["kind"] == "param":
                e["role"] = param_role(rel)
            block.append(e)
        else:
            rest += [dict(e, role=param_role(e["name"])) if e["kind"] == "param"
                     else dict(e, role=role_of(rel)) if e["kind"] == "linear" else e for e in by_index.values()]
    head_mod = model.get_output_embeddings()
    head = next((n for n, m in model.named_modules() if m is head_mod), "") if head_mod is not None else ""
    emb_mod = model.get_input_embeddings()
    embedding = next((n for n, m in model.named_modules() if m is emb_mod), "")
    tied = _ties(model)
    head_tied = bool(head) and any(a == f"{head}.weight" or b == f"{head}.weight" for a, b in tied)
    return {"block_prefix": prefix or "", "n_blocks": n_blocks, "head": head, "head_tied": head_tied,
            "input_embedding": embedding, "tied": tied, "block": block, "other": rest}


def _ties(model) -> list[list[str]]:
    first: dict[int, str] = {}
    pairs = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            pairs.append([name, first[id(p)]])
        else:
            first[id(p)] = name
    return pairs


# ---------------------------------------------------------------- scalar facts


def _get(cfg, *keys, default=None):
    for k in keys:
        v = getattr(cfg, k, None)
        if v is not None:
            return v
    return default


def norm_kind(model, tree: dict) -> str:
    """"layernorm" or "rmsnorm" for the blocks' norms, from their classes: an `nn.LayerNorm` (ModernBERT's
    `nn.LayerNorm(bias=False)` included) or a norm with a bias is a LayerNorm; other bias-free norms normalise
    by the root mean square (LlamaRMSNorm, T5's T5LayerNorm despite its name)."""
    from torch import nn

    prefix = tree["block_prefix"] + "."
    norms = [m for name, m in model.named_modules() if name.startswith(prefix) and _is_norm(m)]
    layer = any(isinstance(m, nn.LayerNorm) or getattr(m, "bias", None) is not None for m in norms)
    return "layernorm" if layer else "rmsnorm"


def _chunked_glu(lin: dict) -> bool:
    """A GLU whose gate and up halves come from one Linear's output split in two (ModernBertMLP: `input, gate
    = Wi(x).chunk(2, dim=-1)`, then `Wo(act(input) * gate)`): the one FFN input Linear is twice as wide as
    what the one output Linear reads."""
    ffn_in = [e for e in lin.values() if e["role"] == "ffn_in"]
    ffn_out = [e for e in lin.values() if e["role"] == "ffn_out"]
    return len(ffn_in) == 1 and len(ffn_out) == 1 and ffn_in[0]["d_out"] == 2 * ffn_out[0]["d_in"]


def scalar_facts(cfg, tree: dict, task: str, norm: str | None = None) -> dict:
    """The card's scalar fields (d_model, n_layers, heads, d_ff, ...) from the text config and the tree; `norm`
    from `norm_kind` (without it: "layernorm" where a block norm has a bias, else "rmsnorm").

    positions: "learned" (a position table), "relative" (T5's relative_attention_bias, DeBERTa-v2's
    rel_embeddings / `relative_attention`), "alibi" (BLOOM, `alibi`), else "rotary"."""
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    d = int(_get(text, "hidden_size", "d_model", "n_embd"))
    h = int(_get(text, "num_attention_heads", "num_heads", "n_head"))
    kv = int(_get(text, "num_key_value_heads", "multi_query_group_num", default=0) or 0)
    if not kv:
        kv = 1 if getattr(text, "multi_query", False) and not getattr(text, "new_decoder_architecture", False) else h
        if getattr(text, "new_decoder_architecture", False):
            kv = int(_get(text, "num_kv_heads", default=h))
    head_dim = int(_get(text, "head_dim", "d_kv", default=0) or d // h)
    block = tree["block"]
    lin = {e["name"]: e for e in block if e["kind"] == "linear"}
    roles = {e["role"] for e in lin.values()}
    ffn_in = [e for e in lin.values() if e["role"] in ("ffn_in", "expert_ffn_in")]
    d_ff = _get(text, "intermediate_size", "ffn_dim", "d_ff", "n_inner", "ffn_hidden_size", default=0)
    if not d_ff and ffn_in:
        d_ff = ffn_in[0]["d_out"]
    d_ff = int(d_ff or 4 * d)
    leaves = {n.rsplit(".", 1)[-1] for n in lin}
    gate_up_param = any(e["kind"] == "param" and e["name"].endswith("gate_up_proj") for e in block + tree["other"])
    gated = bool({"gate_proj", "gate_up_proj", "wi_0", "w1"} & leaves) or gate_up_param or _chunked_glu(lin)
    norms = [e for e in block if e["kind"] == "norm"]
    norm_bias = any(e["bias"] for e in norms)
    names = " ".join(e["name"] for e in tree["other"] + block)
    relative = bool(re.search(r"relative_attention_bias|rel_embeddings", names)
                    or getattr(text, "relative_attention", False) is True)
    positions = ("learned" if re.search(r"position_embeddings|embed_positions|wpe\b", names)
                 else "relative" if relative
                 else "alibi" if getattr(text, "alibi", False) or text.model_type == "bloom" else "rotary")
    emb = next((e for e in tree["other"] if e["name"] == tree["input_embedding"]), None)
    vocab = int(_get(text, "vocab_size", default=emb["rows"] if emb else 0))
    attn_in = [e for e in lin.values() if e["role"] == "attn_in"]
    attn_out = [e for e in lin.values() if e["role"] == "attn_out"]
    ffn_lin = [e for e in lin.values() if e["role"].endswith(("ffn_in", "ffn_out"))]
    qk_norm = any(e["kind"] == "norm" and re.search(r"(^|\.)(q|k)_(norm|layernorm)$", e["name"]) for e in block)
    experts = _moe_facts(text, tree)
    return dict(
        d_model=d, n_layers=int(tree["n_blocks"] or _get(text, "num_hidden_layers", "num_layers")), n_heads=h,
        n_kv_heads=kv, head_dim=head_dim, d_ff=d_ff, vocab_size=vocab,
        max_positions=int(_get(text, "max_position_embeddings", "n_positions", "max_seq_len", default=0) or 0),
        gated_mlp=gated, activation=str(_get(text, "hidden_act", "hidden_activation", "activation_function",
                                             "feed_forward_proj", default="gelu")),
        tie_embeddings=bool(tree["head_tied"]), attention_bias=any(e["bias"] for e in attn_in),
        attention_out_bias=any(e["bias"] for e in attn_out), mlp_bias=any(e["bias"] for e in ffn_lin),
        norm=norm or ("layernorm" if norm_bias else "rmsnorm"), positions=positions,
        task=task, qk_norm=qk_norm, cross_attention="cross_attn_in" in roles,
        parallel_block=bool(getattr(text, "parallel_attn", False) or getattr(text, "use_parallel_residual", False)
                            or text.model_type == "gptj"),
        **experts,
    )


def _moe_facts(text, tree: dict) -> dict:
    E = int(_get(text, "num_local_experts", "num_experts", "n_routed_experts", default=0) or 0)
    k = int(_get(text, "num_experts_per_tok", "num_experts_per_token", "moe_topk", default=0) or 0) if E else 0
    ff = int(_get(text, "moe_intermediate_size", "intermediate_size_moe", default=0) or 0) if E else 0
    if E and not ff:
        ff = int(_get(text, "intermediate_size", default=0) or 0)
    shared = int(_get(text, "n_shared_experts", "num_shared_experts", default=0) or 0) if E else 0
    if E and not shared and any("shared_expert" in e["name"] for e in tree["block"] + tree["other"]):
        shared = 1
    mt = text.model_type
    return dict(n_experts=E, experts_per_token=k, expert_d_ff=ff, n_shared_experts=shared,
                router_norm_topk=bool(E) and bool(getattr(text, "norm_topk_prob", mt in _ROUTER_ALWAYS_NORMALISES)),
                router_weights_fp32=bool(E) and mt in _ROUTER_FP32_WEIGHTS,
                router_aux_loss=bool(E) and bool(getattr(text, "output_router_logits", False)))


# Router behaviour that is code, not config (transformers 5.24): MixtralTopKRouter divides its top-k values by
# their sum unconditionally (others follow config.norm_topk_prob) and returns them in its softmax's fp32, as
# DeepseekV2TopkRouter does (top-k of its fp32 scores times routed_scaling_factor); Qwen3-MoE and gpt-oss cast them
# back to the activation dtype.
_ROUTER_ALWAYS_NORMALISES = frozenset({"mixtral", "minimax"})
_ROUTER_FP32_WEIGHTS = frozenset({"mixtral", "minimax", "deepseek_v2"})


# ---------------------------------------------------------------- the card


def generate(config: dict, name: str, source: str, sha256: str, task: str | None = None,
             text_only: bool = False) -> dict:
    """Card fields for a config.json dict. Raises PlanError (one line) for what cannot be built."""
    import transformers

    mt = config.get("model_type")
    task, model = meta_model_from_dict(config, task, text_only)
    tree = module_tree(model)
    if not tree["block_prefix"]:
        raise PlanError(f"model type '{mt}' is not supported: peftplan found no repeated block list in it")
    cfg = model.config
    text = cfg.get_text_config()
    for what, keys in (("hidden size", ("hidden_size", "d_model", "n_embd")),
                       ("attention heads", ("num_attention_heads", "num_heads", "n_head"))):
        if _get(text, *keys) is None:
            raise PlanError(f"model type '{mt}' is not supported: its config has no {what} (peftplan plans "
                            "transformer blocks with attention)")
    try:
        facts = scalar_facts(cfg, tree, task, norm_kind(model, tree))
    except (TypeError, ValueError, KeyError, ZeroDivisionError) as e:
        raise PlanError(f"model type '{mt}' is not supported: cannot read its sizes ({_first_line(e)})") from None
    return dict(
        name=name, source=source, model_type=cfg.model_type, **facts,
        generated=True, config_sha256=sha256, transformers_version=transformers.__version__,
        model_class=type(model).__name__, text_only=text_only, config=config, tree=tree,
    )


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return f"{v:_}" if abs(v) >= 10_000 else str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def card_toml(fields: dict, comment: str = "") -> str:
    """A generated card as TOML. The config is kept as JSON text (TOML has no null); the tree as tables."""
    lines = [f"# {line}" for line in comment.splitlines()] if comment else []
    lines.append("# Generated by `peftplan card import` from the config.json named in `source`; do not edit.")
    tree = fields["tree"]
    for k, v in fields.items():
        if k in ("config", "tree"):
            continue
        lines.append(f"{k} = {_toml_value(v)}")
    lines.append(f"config = {json.dumps(json.dumps(fields['config'], sort_keys=True))}")
    lines.append("")
    lines.append("[tree]")
    for k in ("block_prefix", "n_blocks", "head", "head_tied", "input_embedding", "tied"):
        lines.append(f"{k} = {_toml_value(tree[k])}")
    for k in ("block", "other"):
        lines.append(f"{k} = [")
        lines += [f"  {_toml_value(e)}," for e in tree[k]]
        lines.append("]")
    return "\n".join(lines) + "\n"


__all__ = ["ROLES", "TASKS", "card_toml", "check_config", "cut_config", "generate", "hf_config_from_dict", "meta_model_from_dict",
           "module_tree", "role_of"]


def import_config(path, name: str | None = None, source: str | None = None, task: str | None = None,
                  text_only: bool = False, comment: str = "") -> tuple[dict, str]:
    """(card fields, TOML text) for a config.json path: what `peftplan card import` writes.

    name defaults to the config's folder name, source to the path (shipped cards pass the config URL).
    """
    import hashlib
    from pathlib import Path

    from peftplan.cardgen_worker import generate as generate_fast
    from peftplan.planning.cards import read_config

    config, raw = read_config(Path(path))
    check_config(config)
    where = Path(path) if Path(path).is_file() else Path(path) / "config.json"
    fields = generate_fast(config, name=name or config.get("_name_or_path") or where.parent.name,
                      source=source or str(where), sha256=hashlib.sha256(raw).hexdigest(), task=task,
                      text_only=text_only)
    return fields, card_toml(fields, comment)
