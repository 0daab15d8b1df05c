"""Every shipped model card: round trips through config.json and equals the transformers model it describes."""
import dataclasses
import json
from functools import cache

import pytest

from peftplan.planning.cards import card_from_hf_config, load_card, registry, to_hf_config

CARDS = sorted(registry())
HAND_WRITTEN = sorted(n for n, c in registry().items() if not c.generated)  # generated: tests/test_cardgen.py

# Published totals (model cards / papers), counted with tied weights once.
PUBLISHED = {
    "opt-6.7b": 6_658_473_984,
    "llama-2-7b": 6_738_415_616,
    "llama-3.1-8b": 8_030_261_248,
    "mistral-7b-v0.1": 7_241_732_096,
    "phi-3-mini": 3_821_079_552,
    "gpt2": 124_439_808,
}


@cache
def built(name: str):
    """The meta-device transformers model of a card, built once (meta costs no memory, even for 405B)."""
    pytest.importorskip("transformers")
    from peftplan.build import meta_model

    return meta_model(registry()[name])


def meta_count(name: str) -> int:
    return sum(p.numel() for p in built(name).parameters())  # parameters() yields a tied tensor once


def test_registry_covers_required_families():
    required = {f"opt-{s}" for s in ("125m", "350m", "1.3b", "2.7b", "6.7b", "13b", "30b", "66b")}
    required |= {f"llama-{s}" for s in ("7b", "13b", "33b", "65b")} | {"llama-2-7b", "llama-2-13b", "llama-2-70b"}
    required |= {"llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b", "llama-3.2-1b", "llama-3.2-3b", "mistral-7b-v0.1"}
    required |= {f"qwen2.5-{s}" for s in ("0.5b", "1.5b", "3b", "7b", "14b", "32b", "72b")}
    required |= {"gemma-2-2b", "gemma-2-9b", "gemma-2-27b", "phi-3-mini", "gpt2", "gpt2-medium", "gpt2-large",
                 "gpt2-xl", "bert-base", "bert-large", "roberta-base", "roberta-large"}
    assert required <= set(CARDS), sorted(required - set(CARDS))


@pytest.mark.parametrize("name", HAND_WRITTEN)
def test_card_round_trips_through_hf_config(name):
    card = registry()[name]
    assert card.source.startswith("https://huggingface.co/") and card.source.endswith("/config.json")
    assert card_from_hf_config(to_hf_config(card), card.name, card.source) == card


@pytest.mark.parametrize("name", HAND_WRITTEN)
def test_card_round_trips_through_config_file(name, tmp_path, monkeypatch):
    """A config.json goes through the generator (cardgen): the same parameters as the hand-written layout."""
    from peftplan.planning.params import count, total_params
    from peftplan.plan import Plan

    monkeypatch.setenv("PEFTPLAN_CACHE", str(tmp_path / "cache"))
    card = registry()[name]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(to_hf_config(card)))
    loaded = load_card(str(path))
    assert loaded.generated and total_params(loaded) == total_params(card)
    for f in ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "tie_embeddings"):
        assert getattr(loaded, f) == getattr(card, f), f
    lora = Plan(method="lora", targets="all-linear")
    assert count(loaded, lora).trainable == count(card, lora).trainable


@pytest.mark.parametrize("name", CARDS)
def test_total_params_equal_transformers(name):
    from peftplan.planning.params import total_params

    assert meta_count(name) == total_params(registry()[name])


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_totals(name):
    assert meta_count(name) == PUBLISHED[name]


@pytest.mark.parametrize("name", CARDS)
def test_model_class_name(name):
    from peftplan.build import model_class_name

    assert model_class_name(registry()[name]) == type(built(name)).__name__


def test_build_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, peftplan.build; print('torch' in sys.modules or 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
