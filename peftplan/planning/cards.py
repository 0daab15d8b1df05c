"""Model cards: every architecture fact that fixes a model's parameter count and tensor shapes.

A card is a frozen dataclass read from `profiles/models/NAME.toml` or from a Hugging Face `config.json`
on disk (never downloaded). Facts are explicit fields, never inferred from ratios: a Llama-2-70B and a
Qwen2.5-72B differ in kv heads, biases and tying, and each of those is a field here.

    d_model      d      hidden size
    n_layers     L      transformer blocks
    n_heads      h      query heads; n_kv_heads = h is MHA, 1 < n_kv_heads < h is GQA, 1 is MQA
    head_dim     d_h    usually d / h (Gemma-2 differs)
    d_ff                FFN inner size (per gate for a gated MLP)
    vocab_size   V

Generated cards (`generated = true`) come from `peftplan card import` or from a config.json on a cache miss
(peftplan/cardgen.py builds the model on meta and walks its module tree). They carry the config's sha256, the
transformers version, the config itself (JSON text, so the model can be rebuilt for trace/profile) and the
module tree (`tree`: block prefix, per-block and model-level entries with shapes and roles, head, ties), which
`layout()` reads instead of per-family code. Generated cards of a config.json are cached in
`PEFTPLAN_CACHE` (default: the platform's user cache folder, `platformdirs.user_cache_dir("peftplan")`), keyed
by sha256 + transformers version + task, so a later call reads TOML and imports no torch.
"""
from __future__ import annotations

import hashlib
import json
import os
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cache
from pathlib import Path

from peftplan.errors import ConfigError, InputFileError, PlanError, quote, suggest
from peftplan.planning.validate import validate_card, validate_config

PROFILES = Path(__file__).resolve().parents[2] / "profiles"
MODELS_DIR = PROFILES / "models"

# The transformers model types whose module layout peftplan knows (see `params.layout`).
DECODERS = ("opt", "llama", "mistral", "qwen2", "gemma2", "phi3", "gpt2")
ENCODERS = ("bert", "roberta")
MODEL_TYPES = DECODERS + ENCODERS


@dataclass(frozen=True)
class ModelCard:
    name: str
    source: str  # URL (or path) of the config.json these facts come from
    model_type: str  # transformers' model_type; fixes module names and layout
    # -- sizes
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    vocab_size: int
    max_positions: int
    # -- structure
    gated_mlp: bool  # SwiGLU/GeGLU: gate and up projections, d_ff each
    activation: str
    tie_embeddings: bool  # lm_head shares the token embedding matrix
    attention_bias: bool  # biases on q, k, v
    attention_out_bias: bool  # bias on the attention output projection
    mlp_bias: bool
    norm: str  # "layernorm" (subtracts the mean; weight + bias, or weight only: ModernBERT) or "rmsnorm"
    positions: str  # "learned" (a table of max_positions rows), "rotary", "relative" (T5, DeBERTa-v2) or "alibi"
    # -- family specifics; the defaults are the common case
    position_offset: int = 0  # OPT and RoBERTa reserve 2 extra rows in the position table
    embed_proj_dim: int = 0  # OPT-350m: embeddings live in 512 dims, projected in/out of d
    final_norm: bool = True  # OPT-350m (post-norm) has no final norm
    sandwich_norms: bool = False  # Gemma-2: extra norms after attention and around the MLP
    type_vocab_size: int = 0  # BERT token-type embeddings
    # -- dropout in training (each active dropout keeps a 1-byte mask per element for backward)
    hidden_dropout: float = 0.0  # on each sublayer output before the residual add
    attention_dropout: float = 0.0  # on the attention probabilities
    embed_dropout: float = 0.0  # on the embedding output
    hf: dict = field(default_factory=dict, compare=False, hash=False)  # config.json fields that fix no shape
    # -- explicit structure facts of the newer families (generated cards fill them from config + module tree)
    task: str = ""  # causal-lm | masked-lm | seq2seq-lm | image-text-to-text | classification; "" = family default
    qk_norm: bool = False  # norms on queries and keys per head (Qwen3, OLMo-2, Gemma-3)
    cross_attention: bool = False  # decoder blocks attend to an encoder (T5)
    parallel_block: bool = False  # attention and MLP read the same input (GPT-J, GPT-NeoX, Falcon)
    n_experts: int = 0  # E routed experts per MoE layer (0: dense)
    experts_per_token: int = 0  # k experts each token is routed to
    expert_d_ff: int = 0  # FFN inner size of one expert
    n_shared_experts: int = 0  # experts every token passes through (DeepSeek-V2, Llama-4)
    router_norm_topk: bool = False  # the router renormalises its k weights to sum 1 (Mixtral; config.norm_topk_prob)
    router_weights_fp32: bool = False  # the routing weights stay in the router's fp32 softmax dtype (Mixtral)
    router_aux_loss: bool = False  # config.output_router_logits: router logits kept for the load-balancing loss
    # -- provenance of generated cards
    generated: bool = False
    config_sha256: str = ""
    transformers_version: str = ""
    model_class: str = ""  # the transformers class the card was read from, e.g. "Qwen3ForCausalLM"
    text_only: bool = False  # a multimodal config planned as its text model alone
    config: dict = field(default_factory=dict, compare=False, hash=False)  # the config.json, to rebuild the model
    tree: dict = field(default_factory=dict, compare=False, hash=False)  # module tree facts (cardgen.module_tree)

    def __hash__(self) -> int:
        # cards key the planner's caches: hash the ~30 fields once
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash(tuple(getattr(self, f.name) for f in fields(self) if f.name not in _UNHASHED))
            object.__setattr__(self, "_hash", h)
        return h

    def __post_init__(self) -> None:
        if isinstance(self.config, str):  # generated cards keep the config as JSON text (TOML has no null)
            object.__setattr__(self, "config", json.loads(self.config))
        if self.model_type not in MODEL_TYPES and not self.generated:
            raise ConfigError(
                f"model type {quote(self.model_type)} is not supported (supported: {', '.join(MODEL_TYPES)})"
            )
        validate_card(self)  # types, ranges and divisibility of every field (planning/validate.py)

    @property
    def encoder(self) -> bool:
        """Encoder-only (bidirectional, masked-LM or classification head)."""
        if self.generated:
            return self.task in ("masked-lm", "classification")
        return self.model_type in ENCODERS

    @property
    def family(self) -> str:
        """The model type without the text-model suffix ('gemma3_text' -> 'gemma3')."""
        return self.model_type.removesuffix("_text")

    @property
    def moe(self) -> bool:
        return self.n_experts > 0

    @property
    def d_q(self) -> int:
        """Width of the query projection, h·d_h."""
        return self.n_heads * self.head_dim

    @property
    def d_kv(self) -> int:
        """Width of each of the key and value projections, h_kv·d_h."""
        return self.n_kv_heads * self.head_dim

    @property
    def d_embed(self) -> int:
        return self.embed_proj_dim or self.d_model

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- card files


def load_card_file(path: Path, cls: type, what: str):
    """One TOML card as `cls(**fields)`; unknown or missing fields are one-line errors."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise InputFileError(f"cannot read {quote(str(path))}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"{path.name}: not a valid TOML card: {str(e).splitlines()[0][:200]}") from None
    unknown = sorted(set(data) - {f.name for f in fields(cls)})
    if unknown:
        raise PlanError(f"{path.name}: unknown {what} field(s) {', '.join(unknown)}")
    try:
        return cls(**data)
    except TypeError as e:
        raise PlanError(f"{path.name}: {e}") from None


def load_registry(directory: Path, cls: type, what: str) -> dict:
    """Every `*.toml` card in a folder, by name."""
    cards = {}
    for path in sorted(directory.glob("*.toml")):
        card = load_card_file(path, cls, what)
        cards[card.name] = card
    return cards


_UNHASHED = ("hf", "config", "tree")
_loaded: dict[str, ModelCard] = {}


@cache
def registry() -> dict[str, ModelCard]:
    """All shipped model cards by name."""
    return load_registry(MODELS_DIR, ModelCard, "card")


def _exists(path: Path) -> tuple[bool, bool]:
    """(is a folder, is a regular file); a name the OS refuses (too long, NUL) or cannot search is an error."""
    try:
        return path.is_dir(), path.is_file()
    except (OSError, ValueError) as e:
        raise InputFileError(f"cannot read {quote(str(path), 200)}: {getattr(e, 'strerror', None) or e}") from None


def hub_cards() -> dict[str, str]:
    """Hub id ("owner/name") -> shipped card name, from the config.json URL each card cites as its `source`
    (https://huggingface.co/<owner>/<name>/blob/main/config.json)."""
    out = {}
    for name, card in registry().items():
        src = card.source or ""
        if "huggingface.co/" in src:
            out["/".join(src.split("huggingface.co/", 1)[1].split("/")[:2])] = name
    return out


def card_for_hub_id(hub_id: str) -> str | None:
    """The shipped card made from the Hub repository `hub_id` (matched case-insensitively, as the Hub resolves
    names), or None."""
    wanted = hub_id.strip().strip("/").lower()
    return next((name for hub, name in hub_cards().items() if hub.lower() == wanted), None)


def load_card(model: str, task: str | None = None, text_only: bool = False) -> ModelCard:
    """A card by registry name, or from a config.json path or a folder holding one (see `card_from_config_path`).

    `task` and `text_only` apply to config.json paths (a shipped card has its own task).
    A Hub id that a shipped card cites as its source (`meta-llama/Llama-3.1-8B`) is that card; any other Hub id is
    refused (nothing is downloaded). Raises PlanError (unknown name), InputFileError (a Hub id without a card, an
    unreadable path), ConfigError (bad config.json).
    """
    if not isinstance(model, str) or not model.strip():
        raise PlanError(f"a model name or path is needed, got {quote(model)}")
    path = Path(model)
    is_dir, is_file = _exists(path)
    if model.endswith(".toml") and is_file:  # a card file, e.g. written by `peftplan card import -o`
        return load_card_file(path, ModelCard, "card")
    if (model.endswith(".json") and not is_file and not is_dir) or (("/" in model or os.sep in model)
                                                                     and not (is_dir or is_file)):
        shipped = card_for_hub_id(model)  # a Hub id a shipped card was made from: that card, nothing downloaded
        if shipped is not None:
            return registry()[shipped]
        # a path that does not exist, or a hub id (never downloaded)
        raise InputFileError(f"no config.json at {quote(model, 200)} (peftplan reads local files only: pass a "
                             "config.json or a folder holding one)")
    own = MODELS_DIR / f"{model}.toml"  # a card file is named after its card: read just that one
    is_card = "/" not in model and "\\" not in model and _exists(own)[1]
    if model.endswith(".json") or is_dir or (is_file and not is_card):  # a stray file never shadows a card
        return card_from_config_path(path, task, text_only)
    if is_card:
        card = _loaded.get(model) or load_card_file(own, ModelCard, "card")
        if card.name == model:
            _loaded[model] = card
            return card
    cards = registry()
    if model in cards:
        return cards[model]
    lowered = {k.lower(): v for k, v in cards.items()}
    if model.lower() in lowered:
        return lowered[model.lower()]
    raise suggest(model, list(cards), "model")


# ---------------------------------------------------------------- config.json <-> card


MAX_CONFIG_BYTES = 2**24  # a real config.json is a few KiB


def read_text_file(path: Path, what: str, limit: int = MAX_CONFIG_BYTES) -> str:
    """A small UTF-8 text file: regular files only (never a FIFO or device), at most `limit` bytes.

    Raises InputFileError for anything else (missing, no permission, too long a name, binary, too big).
    """
    where = quote(str(path), 200)
    is_dir, is_file = _exists(path)
    if not is_file:
        why = "a folder" if is_dir else "not a regular file" if path.exists() else "no such file"
        raise InputFileError(f"cannot read {what} {where}: {why}")
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise InputFileError(f"cannot read {what} {where}: {e.strerror or e}") from None
    if len(data) > limit:
        raise InputFileError(f"{what} {where} is larger than {limit // 2**20} MiB")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputFileError(f"{what} {where} is not UTF-8 text") from None


def read_config(path: Path) -> tuple[dict, bytes]:
    """(config dict, file bytes) of a config.json or a folder holding one.

    Raises InputFileError (unreadable) or ConfigError (not JSON, not an object, fields of the wrong type)."""
    if _exists(path)[0]:
        path = path / "config.json"
    text = read_text_file(path, "config.json")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{quote(str(path))} is not valid JSON: {e}") from None
    except RecursionError:
        raise ConfigError(f"{quote(str(path))} is nested too deeply to be a config.json") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{quote(str(path))} does not hold a JSON object")
    validate_config(config)
    return config, text.encode("utf-8")


def cache_dir() -> Path:
    """Where generated cards of config.json files are kept: $PEFTPLAN_CACHE, else the user cache folder."""
    env = os.environ.get("PEFTPLAN_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("peftplan")) / "cards"


def _transformers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        raise PlanError("reading a config.json needs transformers (pip install 'peftplan[torch]')") from None


def card_from_config_path(path: Path, task: str | None = None, text_only: bool = False) -> ModelCard:
    """The generated card of a config.json: from the cache when this config, transformers version and task
    were seen before (TOML, no torch), else built on meta by `peftplan.cardgen` and cached (atomic write).

    Raises PlanError (one line): unreadable or invalid JSON, remote code (auto_map), contradictory sizes,
    a model type the installed transformers does not know.
    """
    from peftplan.cardgen import check_config  # pure Python; cardgen imports torch only inside functions

    config, raw = read_config(path)
    if not isinstance(config.get("model_type"), str):
        check_config(config)  # the one-line error for a config without model_type
    sha = hashlib.sha256(raw).hexdigest()
    where = path if path.is_file() else path / "config.json"
    name = str(config.get("_name_or_path") or where.parent.name or where.stem)
    key = f"{sha[:40]}-tf{_transformers_version()}-{task or 'auto'}{'-text' if text_only else ''}.toml"
    cached = cache_dir() / key
    if cached.is_file():
        try:
            card = load_card_file(cached, ModelCard, "card")
        except (PlanError, tomllib.TOMLDecodeError, OSError):
            card = None  # a damaged cache entry is rebuilt
        if card is not None:  # validated when it was generated
            same = card.name == name and card.source == str(where)
            return card if same else replace(card, name=name, source=str(where))
    check_config(config)  # refuse remote code and contradictory sizes before importing torch
    from peftplan.cardgen import card_toml
    from peftplan.cardgen_worker import generate  # a forked worker that skips what a meta build never runs

    fields_ = generate(config, name=name, source=str(where), sha256=sha, task=task, text_only=text_only)
    card = ModelCard(**fields_)
    write_atomic(cached, card_toml(fields_))
    return card


def write_atomic(path: Path, text: str) -> None:
    """Write text to path through a temporary file in the same folder and `os.replace`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _need(config: dict, key: str, model_type: str) -> int:
    """A required size (already checked by `validate_config`: a whole number in its bounds)."""
    if key not in config or config[key] is None:
        raise ConfigError(f"config.json of a '{model_type}' model lacks '{key}'")
    return int(config[key])


_INT_KEYS = ("n_inner", "num_key_value_heads", "head_dim", "word_embed_proj_dim", "type_vocab_size")


def card_from_hf_config(config: dict, name: str, source: str) -> ModelCard:
    """Read the shape facts of a transformers config dict; say clearly what cannot be read.

    Raises ConfigError (planning/validate.py `validate_config`) before any arithmetic on the fields.
    """
    validate_config(config)
    mt = config.get("model_type")
    if not mt:
        raise PlanError("config.json has no 'model_type'")
    if mt not in MODEL_TYPES:
        raise ConfigError(f"model type {quote(mt)} is not supported (supported: {', '.join(MODEL_TYPES)})")
    if config.get("quantization_config"):
        pass  # a pre-quantized checkpoint still has the same shapes; the plan decides the storage
    n = lambda key: _need(config, key, mt)  # noqa: E731
    def get(key: str, default=None):  # null means absent; validate_config has checked the rest
        value = config.get(key)
        return default if value is None else (int(value) if key in _INT_KEYS else value)

    if mt == "gpt2":
        d = n("n_embd")
        return ModelCard(
            name=name, source=source, model_type=mt, d_model=d, n_layers=n("n_layer"), n_heads=n("n_head"),
            n_kv_heads=n("n_head"), head_dim=d // n("n_head"), d_ff=get("n_inner") or 4 * d,
            vocab_size=n("vocab_size"), max_positions=n("n_positions"), gated_mlp=False,
            activation=get("activation_function", "gelu_new"), tie_embeddings=get("tie_word_embeddings", True),
            attention_bias=True, attention_out_bias=True, mlp_bias=True, norm="layernorm", positions="learned",
            hidden_dropout=get("resid_pdrop", 0.1), attention_dropout=get("attn_pdrop", 0.1),
            embed_dropout=get("embd_pdrop", 0.1), hf={"layer_norm_epsilon": get("layer_norm_epsilon", 1e-5)},
        )
    d, h = n("hidden_size"), n("num_attention_heads")
    common = dict(
        name=name, source=source, model_type=mt, d_model=d, n_layers=n("num_hidden_layers"), n_heads=h,
        vocab_size=n("vocab_size"), max_positions=n("max_position_embeddings"),
    )
    if mt == "opt":
        proj = get("word_embed_proj_dim") or d
        pre_norm = get("do_layer_norm_before", True)
        bias = get("enable_bias", True)
        return ModelCard(
            **common, n_kv_heads=h, head_dim=d // h, d_ff=n("ffn_dim"), gated_mlp=False,
            activation=get("activation_function", "relu"), tie_embeddings=get("tie_word_embeddings", True),
            attention_bias=bias, attention_out_bias=bias, mlp_bias=bias, norm="layernorm", positions="learned",
            position_offset=2, embed_proj_dim=proj if proj != d else 0,
            final_norm=bool(pre_norm and not get("_remove_final_layer_norm", False)),
            hidden_dropout=get("dropout", 0.1), attention_dropout=get("attention_dropout", 0.0),
            hf={"do_layer_norm_before": pre_norm},
        )
    if mt in ENCODERS:
        return ModelCard(
            **common, n_kv_heads=h, head_dim=d // h, d_ff=n("intermediate_size"), gated_mlp=False,
            activation=get("hidden_act", "gelu"), tie_embeddings=get("tie_word_embeddings", True),
            attention_bias=True, attention_out_bias=True, mlp_bias=True, norm="layernorm", positions="learned",
            position_offset=2 if mt == "roberta" else 0,  # RoBERTa's positions start past padding_idx 1
            type_vocab_size=get("type_vocab_size", 2), hidden_dropout=get("hidden_dropout_prob", 0.1),
            attention_dropout=get("attention_probs_dropout_prob", 0.1), embed_dropout=get("hidden_dropout_prob", 0.1),
            hf={k: config[k] for k in ("layer_norm_eps", "pad_token_id") if k in config},
        )
    # rotary decoders: llama, mistral, qwen2, gemma2, phi3
    kv = get("num_key_value_heads") or h
    head_dim = get("head_dim") or d // h
    tie_default = mt == "gemma2"
    hf_keys = ("rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "sliding_window",
               "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "pad_token_id")
    return ModelCard(
        **common, n_kv_heads=kv, head_dim=head_dim, d_ff=n("intermediate_size"), gated_mlp=True,
        activation=get("hidden_act") or get("hidden_activation") or "silu",
        tie_embeddings=get("tie_word_embeddings", tie_default),
        attention_bias=(mt == "qwen2") or bool(get("attention_bias", False)),
        attention_out_bias=bool(get("attention_bias", False)) and mt in ("llama", "gemma2"),
        mlp_bias=bool(get("mlp_bias", False)) and mt == "llama", norm="rmsnorm", positions="rotary",
        sandwich_norms=mt == "gemma2", attention_dropout=get("attention_dropout") or 0.0,
        hidden_dropout=get("resid_pdrop") or 0.0, embed_dropout=get("embd_pdrop") or 0.0,
        hf={k: config[k] for k in hf_keys if config.get(k) is not None},
    )


def to_hf_config(card: ModelCard) -> dict:
    """The transformers config fields (with model_type) that rebuild this card's architecture."""
    c = card
    if c.model_type == "gpt2":
        cfg = dict(n_embd=c.d_model, n_layer=c.n_layers, n_head=c.n_heads, n_inner=c.d_ff,
                   vocab_size=c.vocab_size, n_positions=c.max_positions, activation_function=c.activation,
                   tie_word_embeddings=c.tie_embeddings, resid_pdrop=c.hidden_dropout,
                   attn_pdrop=c.attention_dropout, embd_pdrop=c.embed_dropout)
    else:
        cfg = dict(hidden_size=c.d_model, num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
                   vocab_size=c.vocab_size, max_position_embeddings=c.max_positions,
                   tie_word_embeddings=c.tie_embeddings)
        if not c.max_positions:  # no position table, no limit (BLOOM's ALiBi)
            del cfg["max_position_embeddings"]
        if c.model_type == "opt":
            cfg.update(ffn_dim=c.d_ff, word_embed_proj_dim=c.d_embed, activation_function=c.activation,
                       enable_bias=c.attention_bias, do_layer_norm_before=c.final_norm,
                       _remove_final_layer_norm=False, dropout=c.hidden_dropout,
                       attention_dropout=c.attention_dropout)
        elif c.encoder:
            cfg.update(intermediate_size=c.d_ff, hidden_act=c.activation, type_vocab_size=c.type_vocab_size,
                       hidden_dropout_prob=c.hidden_dropout, attention_probs_dropout_prob=c.attention_dropout)
        else:
            cfg.update(intermediate_size=c.d_ff, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
                       hidden_act=c.activation)
            cfg["attention_dropout"] = c.attention_dropout
            if c.model_type == "phi3":
                cfg.update(resid_pdrop=c.hidden_dropout, embd_pdrop=c.embed_dropout)
            if c.model_type == "gemma2":
                cfg["hidden_activation"] = c.activation
            if c.model_type == "llama":
                cfg.update(attention_bias=c.attention_bias, mlp_bias=c.mlp_bias)
    cfg.update(c.hf)
    cfg["model_type"] = c.model_type
    return cfg
