"""Tiny random models of every family, for tests, benchmarks and dry runs.

Each is a config.json-style dict read by `cards.card_from_hf_config`, as a user's config.json would be:
d = 64, L = 2, h = 4 (h_kv = 2 where the family has GQA), d_ff = 128, V = 128, 64 positions.
"""
from __future__ import annotations

from dataclasses import replace

from peftplan.planning.cards import ModelCard, card_from_hf_config

_ROTARY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=128, vocab_size=128, max_position_embeddings=64)
_ENCODER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=128,
                type_vocab_size=2)

TINY_CONFIGS: dict[str, dict] = {
    "opt": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128, vocab_size=128,
                max_position_embeddings=64, word_embed_proj_dim=64, do_layer_norm_before=True),
    "llama": _ROTARY,
    "mistral": _ROTARY,
    "qwen2": _ROTARY,
    "gemma2": dict(_ROTARY, head_dim=16),
    "phi3": dict(_ROTARY, pad_token_id=0),  # its class default pad id (32000) is outside a tiny vocabulary
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64),
    "bert": dict(_ENCODER, max_position_embeddings=64, pad_token_id=0),
    "roberta": dict(_ENCODER, max_position_embeddings=66, pad_token_id=1),  # 2 rows reserved past the padding id
}

# config fields that switch dropout off, so a fixed batch gives a deterministic loss
NO_DROPOUT: dict[str, dict] = {
    "opt": dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0),
    "gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "bert": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "roberta": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
}


def tiny_card(model_type: str, *, dropout: bool = False, **config) -> ModelCard:
    """A tiny card of the family; `config` overrides config.json fields; dropout off unless asked for."""
    fields = {"model_type": model_type, **TINY_CONFIGS[model_type], **config}
    card = card_from_hf_config(fields, name=f"tiny-{model_type}", source="peftplan.measure.tiny")
    if dropout:
        return card
    return replace(card, hf={**card.hf, **NO_DROPOUT.get(model_type, {})})
