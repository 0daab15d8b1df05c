"""Module layout of each supported transformers architecture: names and shapes of every parameter.

The names are transformers' own module paths, so LoRA targets match exactly as peft matches them
(exact name or `.suffix`); `{i}` stands for the block index. Shapes come from the card's explicit facts.
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
    # Norms that "train with the adapters" in the Houlsby recipe: all LayerNorms of the blocks.

    def block_name(self, i: int, rel: str) -> str:
        return f"{self.block_prefix}.{i}.{rel}"


def _attention(c: ModelCard, q: str, k: str, v: str, o: str) -> tuple[Linear, ...]:
    # q proj + k proj + v proj + attention output
    return (
        Linear(q, c.d_model, c.d_q, c.attention_bias),
        Linear(k, c.d_model, c.d_kv, c.attention_bias),
        Linear(v, c.d_model, c.d_kv, c.attention_bias),
        Linear(o, c.d_q, c.d_model, c.attention_out_bias),
    )


def _mlp(c: ModelCard, up: str, down: str, gate: str | None = None) -> tuple[Linear, ...]:
    gated = (Linear(gate, c.d_model, c.d_ff, c.mlp_bias),) if gate else ()
    return gated + (Linear(up, c.d_model, c.d_ff, c.mlp_bias), Linear(down, c.d_ff, c.d_model, c.mlp_bias))


@cache
def layout(c: ModelCard) -> Layout:
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
                                     "self_attn.out_proj") + (Linear("fc1", d, c.d_ff, c.mlp_bias),
                                                              Linear("fc2", c.d_ff, d, c.mlp_bias)),
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
            block_linears=(Linear("attn.c_attn", d, 3 * d, True), Linear("attn.c_proj", d, d, True),
                           Linear("mlp.c_fc", d, c.d_ff, True), Linear("mlp.c_proj", c.d_ff, d, True)),
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
                                     "attention.output.dense") + (Linear("intermediate.dense", d, c.d_ff, True),
                                                                  Linear("output.dense", c.d_ff, d, True)),
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
        linears = (Linear("self_attn.qkv_proj", d, c.d_q + 2 * c.d_kv, c.attention_bias),
                   Linear("self_attn.o_proj", c.d_q, d, c.attention_out_bias),
                   Linear("mlp.gate_up_proj", d, 2 * c.d_ff, c.mlp_bias),
                   Linear("mlp.down_proj", c.d_ff, d, c.mlp_bias))
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
