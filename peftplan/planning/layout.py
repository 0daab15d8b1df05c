"""Module layout of a card: names and shapes of every parameter.

The names are transformers' own module paths, so LoRA targets match exactly as peft matches them
(exact name or `.suffix`); `{i}` stands for the block index. A generated card carries the module tree read
from transformers (peftplan/cardgen.py) and its layout is read from it; the hand-written families below
(the original nine) build it from the card's explicit facts.

Every block Linear has a ROLE (cardgen.ROLES): attn_in reads the attention norm's output (q, k, v or fused
qkv), attn_latent reads an MLA latent norm (q_b_proj, kv_b_proj), attn_out, cross_attn_in/out (T5 decoder),
ffn_in (gate/up or fused gate_up), ffn_out, router, expert_ffn_in/out (experts that are Linears),
shared_ffn_in/out (shared experts), other. The memory model groups Linears by role, not by model type.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from peftplan.planning.cards import ModelCard


@dataclass(frozen=True)
class Linear:
    name: str  # module path relative to the block (block linears) or to the model (others)
    d_in: int
    d_out: int
    bias: bool
    role: str = "other"

    @property
    def weight_numel(self) -> int:
        return self.d_in * self.d_out

    @property
    def numel(self) -> int:
        return self.d_in * self.d_out + (self.d_out if self.bias else 0)


@dataclass(frozen=True)
class Norm:
    name: str
    size: int
    bias: bool

    @property
    def numel(self) -> int:
        return self.size * (2 if self.bias else 1)


@dataclass(frozen=True)
class Embedding:
    name: str
    rows: int
    cols: int

    @property
    def numel(self) -> int:
        return self.rows * self.cols


@dataclass(frozen=True)
class Param:
    """A parameter that is not a Linear, norm or embedding weight: fused 3-D expert weights (E, out, in),
    routers that are not Linears, attention sinks, convolutions, position tables held as bare parameters."""
    name: str
    shape: tuple[int, ...]
    role: str = "other"  # expert | shared_expert | router | sink | other (cardgen.param_role)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def expert(self) -> bool:
        """Holds routed experts' weights (one slice per expert along dim 0)."""
        return self.role == "expert"


@dataclass(frozen=True)
class Layout:
    block_prefix: str  # e.g. "model.layers": block i is "model.layers.{i}"
    block_linears: tuple[Linear, ...]
    block_norms: tuple[Norm, ...]
    embeddings: tuple[Embedding, ...]  # token embedding first
    other_linears: tuple[Linear, ...]  # Linears outside the blocks, output head excluded
    other_norms: tuple[Norm, ...]
    head: str  # output head module path
    head_rows: int  # V
    head_cols: int  # width the head reads
    head_tied: bool
    head_bias: int  # untied bias elements beside a tied head (BERT/RoBERTa MLM)
    block_params: tuple[Param, ...] = ()  # per-block parameters that are none of the above (names block-relative)
    other_params: tuple[Param, ...] = ()  # model-level ones (full names), incl. blocks that differ from the rest
    # Norms that "train with the adapters" in the Houlsby recipe: all LayerNorms of the blocks.

    def block_name(self, i: int, rel: str) -> str:
        return f"{self.block_prefix}.{i}.{rel}"


def _attention(c: ModelCard, q: str, k: str, v: str, o: str) -> tuple[Linear, ...]:
    # q proj + k proj + v proj + attention output
    return (
        Linear(q, c.d_model, c.d_q, c.attention_bias, "attn_in"),
        Linear(k, c.d_model, c.d_kv, c.attention_bias, "attn_in"),
        Linear(v, c.d_model, c.d_kv, c.attention_bias, "attn_in"),
        Linear(o, c.d_q, c.d_model, c.attention_out_bias, "attn_out"),
    )


def _mlp(c: ModelCard, up: str, down: str, gate: str | None = None) -> tuple[Linear, ...]:
    gated = (Linear(gate, c.d_model, c.d_ff, c.mlp_bias, "ffn_in"),) if gate else ()
    return gated + (Linear(up, c.d_model, c.d_ff, c.mlp_bias, "ffn_in"),
                    Linear(down, c.d_ff, c.d_model, c.mlp_bias, "ffn_out"))


def _from_tree(c: ModelCard) -> Layout:
    """The layout of a generated card, from its stored module tree (cardgen.module_tree)."""
    t = c.tree
    lin, norms, params = [], [], []
    for e in t["block"]:
        if e["kind"] == "linear":
            lin.append(Linear(e["name"], e["d_in"], e["d_out"], e["bias"], e.get("role", "other")))
        elif e["kind"] == "norm" and e.get("weight", True):
            norms.append(Norm(e["name"], e["size"], e["bias"]))
        elif e["kind"] == "norm":  # bias-only norm
            params.append(Param(f"{e['name']}.bias", (e["size"],)))
        else:
            params.append(Param(e["name"], tuple(e["shape"]), e.get("role", "other")))
    emb, o_lin, o_norms, o_params = [], [], [], []
    head = None
    for e in t["other"]:
        k = e["kind"]
        if k == "linear" and e["name"] == t["head"]:
            head = e
        elif k == "linear":
            o_lin.append(Linear(e["name"], e["d_in"], e["d_out"], e["bias"], e.get("role", "other")))
        elif k == "embedding":
            emb.append(Embedding(e["name"], e["rows"], e["cols"]))
        elif k == "norm" and e.get("weight", True):
            o_norms.append(Norm(e["name"], e["size"], e["bias"]))
        elif k == "norm":
            o_params.append(Param(f"{e['name']}.bias", (e["size"],)))
        else:
            o_params.append(Param(e["name"], tuple(e["shape"]), e.get("role", "other")))
    emb.sort(key=lambda x: x.name != t["input_embedding"])  # token embedding first
    if head is not None:  # untied head: its weight (and bias) are counted through head_rows/cols/bias
        rows, cols, bias = head["d_out"], head["d_in"], head["d_out"] if head["bias"] else 0
    else:  # tied (or no) head: its weight is the token embedding's; a bias is a loose parameter in `other`
        rows, cols, bias = (emb[0].rows, emb[0].cols, 0) if emb else (0, 0, 0)
    return Layout(
        block_prefix=t["block_prefix"], block_linears=tuple(lin), block_norms=tuple(norms),
        embeddings=tuple(emb), other_linears=tuple(o_lin), other_norms=tuple(o_norms), head=t["head"],
        head_rows=rows, head_cols=cols, head_tied=head is None, head_bias=bias,
        block_params=tuple(params), other_params=tuple(o_params),
    )


@cache
def layout(c: ModelCard) -> Layout:
    if c.tree:
        return _from_tree(c)
    ln = c.norm == "layernorm"
    d, V = c.d_model, c.vocab_size
    if c.model_type == "opt":
        p = "model.decoder"
        others = ()
        if c.embed_proj_dim:
            others = (Linear(f"{p}.project_out", d, c.embed_proj_dim, False),
                      Linear(f"{p}.project_in", c.embed_proj_dim, d, False))
        return Layout(
            block_prefix=f"{p}.layers",
            block_linears=_attention(c, "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                     "self_attn.out_proj") + (Linear("fc1", d, c.d_ff, c.mlp_bias, "ffn_in"),
                                                              Linear("fc2", c.d_ff, d, c.mlp_bias, "ffn_out")),
            block_norms=(Norm("self_attn_layer_norm", d, True), Norm("final_layer_norm", d, True)),
            embeddings=(Embedding(f"{p}.embed_tokens", V, c.d_embed),
                        Embedding(f"{p}.embed_positions", c.max_positions + c.position_offset, d)),
            other_linears=others,
            other_norms=(Norm(f"{p}.final_layer_norm", d, True),) if c.final_norm else (),
            head="lm_head", head_rows=V, head_cols=c.d_embed, head_tied=c.tie_embeddings, head_bias=0,
        )
    if c.model_type == "gpt2":
        return Layout(
            block_prefix="transformer.h",
            block_linears=(Linear("attn.c_attn", d, 3 * d, True, "attn_in"), Linear("attn.c_proj", d, d, True, "attn_out"),
                           Linear("mlp.c_fc", d, c.d_ff, True, "ffn_in"),
                           Linear("mlp.c_proj", c.d_ff, d, True, "ffn_out")),
            block_norms=(Norm("ln_1", d, True), Norm("ln_2", d, True)),
            embeddings=(Embedding("transformer.wte", V, d), Embedding("transformer.wpe", c.max_positions, d)),
            other_linears=(), other_norms=(Norm("transformer.ln_f", d, True),),
            head="lm_head", head_rows=V, head_cols=d, head_tied=c.tie_embeddings, head_bias=0,
        )
    if c.encoder:
        p = c.model_type  # "bert" | "roberta"
        if p == "bert":
            mlm_dense, mlm_norm, head, bias = ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
                                               "cls.predictions.decoder", V)
        else:
            mlm_dense, mlm_norm, head, bias = "lm_head.dense", "lm_head.layer_norm", "lm_head.decoder", V
        return Layout(
            block_prefix=f"{p}.encoder.layer",
            block_linears=_attention(c, "attention.self.query", "attention.self.key", "attention.self.value",
                                     "attention.output.dense") + (Linear("intermediate.dense", d, c.d_ff, True, "ffn_in"),
                                                                  Linear("output.dense", c.d_ff, d, True, "ffn_out")),
            block_norms=(Norm("attention.output.LayerNorm", d, True), Norm("output.LayerNorm", d, True)),
            embeddings=(Embedding(f"{p}.embeddings.word_embeddings", V, d),
                        Embedding(f"{p}.embeddings.position_embeddings", c.max_positions, d),
                        Embedding(f"{p}.embeddings.token_type_embeddings", c.type_vocab_size, d)),
            other_linears=(Linear(mlm_dense, d, d, True),),
            other_norms=(Norm(f"{p}.embeddings.LayerNorm", d, True), Norm(mlm_norm, d, True)),
            head=head, head_rows=V, head_cols=d, head_tied=c.tie_embeddings, head_bias=bias,
        )
    # rotary decoders
    if c.model_type == "phi3":
        linears = (Linear("self_attn.qkv_proj", d, c.d_q + 2 * c.d_kv, c.attention_bias, "attn_in"),
                   Linear("self_attn.o_proj", c.d_q, d, c.attention_out_bias, "attn_out"),
                   Linear("mlp.gate_up_proj", d, 2 * c.d_ff, c.mlp_bias, "ffn_in"),
                   Linear("mlp.down_proj", c.d_ff, d, c.mlp_bias, "ffn_out"))
    else:
        linears = _attention(c, "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj") + \
            _mlp(c, "mlp.up_proj", "mlp.down_proj", gate="mlp.gate_proj")
    norms = (Norm("input_layernorm", d, ln), Norm("post_attention_layernorm", d, ln))
    if c.sandwich_norms:
        norms += (Norm("pre_feedforward_layernorm", d, ln), Norm("post_feedforward_layernorm", d, ln))
    return Layout(
        block_prefix="model.layers", block_linears=linears, block_norms=norms,
        embeddings=(Embedding("model.embed_tokens", V, d),), other_linears=(),
        other_norms=(Norm("model.norm", d, ln),),
        head="lm_head", head_rows=V, head_cols=d, head_tied=c.tie_embeddings, head_bias=0,
    )
