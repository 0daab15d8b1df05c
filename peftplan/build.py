"""The transformers model a card describes, built on the meta device: exact shapes, no memory, no download.

    hf_config(card)       transformers `PretrainedConfig` from `to_hf_config(card)` via `AutoConfig.for_model`
    meta_model(card)      the causal-LM (decoders) or masked-LM (BERT/RoBERTa) model on meta; tests compare its
                          parameter count with `peftplan.planning.params.total_params`
    model_class_name      the transformers class `meta_model` builds, without importing transformers

Built under `with torch.device("meta")`, which keeps tied embeddings tied; `accelerate.init_empty_weights`
does not (OPT's lm_head is counted twice until `tie_weights()`, see NOTES.md).
torch and transformers are imported inside the functions: the planning path never imports them.
"""
from __future__ import annotations

from peftplan.planning.cards import ModelCard, to_hf_config
from peftplan.errors import PlanError

TASKS = ("causal-lm", "masked-lm")

# transformers' Auto*-mapping entries for the supported model types
_CLASSES: dict[tuple[str, str], str] = {
    ("opt", "causal-lm"): "OPTForCausalLM",
    ("llama", "causal-lm"): "LlamaForCausalLM",
    ("mistral", "causal-lm"): "MistralForCausalLM",
    ("qwen2", "causal-lm"): "Qwen2ForCausalLM",
    ("gemma2", "causal-lm"): "Gemma2ForCausalLM",
    ("phi3", "causal-lm"): "Phi3ForCausalLM",
    ("gpt2", "causal-lm"): "GPT2LMHeadModel",
    ("bert", "masked-lm"): "BertForMaskedLM",
    ("roberta", "masked-lm"): "RobertaForMaskedLM",
}


def default_task(card: ModelCard) -> str:
    if card.generated:
        return card.task
    return "masked-lm" if card.encoder else "causal-lm"


def _task(card: ModelCard, task: str | None) -> str:
    task = task or default_task(card)
    if card.generated:
        if task != card.task:
            raise PlanError(f"model '{card.name}' was imported for '{card.task}', not '{task}'")
        return task
    if (card.model_type, task) not in _CLASSES:
        raise PlanError(f"model '{card.name}' ({card.model_type}) has no '{task}' head in peftplan "
                        f"(use {default_task(card)})")
    return task


def model_class_name(card: ModelCard, task: str | None = None) -> str:
    """The transformers class `meta_model` builds for the card, e.g. 'OPTForCausalLM'."""
    if card.generated:
        _task(card, task)
        return card.model_class
    return _CLASSES[(card.model_type, _task(card, task))]


def hf_config(card: ModelCard):
    """The card as a transformers `PretrainedConfig` (no download: every field comes from the card)."""
    from transformers import AutoConfig

    if card.generated:
        from peftplan.cardgen import cut_config, hf_config_from_dict

        config = hf_config_from_dict(card.config)
        config = config.get_text_config() if card.text_only else config
        return cut_config(config, card.tree, card.n_layers)
    fields = to_hf_config(card)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    pad = getattr(config, "pad_token_id", None)
    if isinstance(pad, int) and not 0 <= pad < card.vocab_size:  # class defaults assume the full vocabulary
        config.pad_token_id = None
    return config


def meta_model(card: ModelCard, task: str | None = None):
    """The card's transformers model on the meta device (tied weights stay tied)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    if card.generated:
        from peftplan.cardgen import meta_model_from_dict

        return meta_model_from_dict(card.config, _task(card, task) if not card.text_only else None,
                                    card.text_only)[1]
    auto = AutoModelForMaskedLM if _task(card, task) == "masked-lm" else AutoModelForCausalLM
    config = hf_config(card)
    with torch.device("meta"):
        return auto.from_config(config)


__all__ = ["TASKS", "default_task", "hf_config", "meta_model", "model_class_name"]
