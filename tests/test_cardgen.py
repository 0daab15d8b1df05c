"""Generated cards (peftplan/cardgen.py) held to transformers on meta and to peft's own LoRA counts.

Every shipped generated card and every config.json of tests/data/configs: total parameters equal the
transformers model built on the meta device; LoRA trainable counts equal `peft.get_peft_model`'s for peft's
default targets (where peft has them) and all-linear, r in {8, 16}. peft takes seconds per model here, so the
whole registry sweep is marked slow (`python -m pytest -m slow tests/test_cardgen.py`); the default run keeps a
sample of families, MoE included.
"""
import dataclasses
import json
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from peftplan.errors import PlanError
from peftplan.planning.cards import load_card, registry
from peftplan.planning.params import DEFAULT_TARGETS, active_params, count, total_params
from peftplan.plan import Plan

CONFIGS = Path(__file__).parent / "data" / "configs"
SOURCES = json.loads((CONFIGS / "sources.json").read_text())
GENERATED = sorted(n for n, c in registry().items() if c.generated)
FAST = ["smollm2-135m", "qwen3-0.6b", "gemma-3-1b", "pythia-1b", "gpt-oss-20b", "flan-t5-base", "modernbert-base",
        "deberta-v3-base", "falcon-7b", "bloom-560m"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PEFTPLAN_CACHE", str(tmp_path_factory.getbasetemp() / "card-cache"))


@cache
def meta(name: str):
    pytest.importorskip("transformers")
    from peftplan.build import meta_model

    return meta_model(registry()[name])


@cache
def peft_trainable(name: str, targets: str | None, r: int) -> int | None:
    """peft's trainable count, or None where peft refuses the targets (ValueError)."""
    peft = pytest.importorskip("peft")
    import copy

    model = copy.deepcopy(meta(name))  # get_peft_model wraps in place
    config = peft.LoraConfig(r=r, lora_alpha=16, target_modules=targets)
    try:
        wrapped = peft.get_peft_model(model, config)
    except ValueError:
        return None
    return sum(p.numel() for p in wrapped.parameters() if p.requires_grad)


def lora(name: str, targets: str | None, r: int) -> int | None:
    try:
        return count(registry()[name], Plan(method="lora", r=r, targets=targets)).trainable
    except PlanError:
        return None


def _specs(name: str) -> list[str | None]:
    card = registry()[name]
    return ([None] if card.model_type in DEFAULT_TARGETS else []) + ["all-linear"]


def test_every_part4_config_is_shipped():
    assert set(SOURCES) <= set(GENERATED), sorted(set(SOURCES) - set(GENERATED))
    assert {p.parent.name for p in CONFIGS.glob("*/config.json")} == set(SOURCES)


@pytest.mark.parametrize("name", GENERATED)
def test_generated_card_total_equals_transformers(name):
    card = registry()[name]
    assert card.source == SOURCES[name]["url"] if name in SOURCES else card.source.startswith("https://")
    assert sum(p.numel() for p in meta(name).parameters()) == total_params(card)
    assert type(meta(name)).__name__ == card.model_class


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_config_on_disk_gives_the_shipped_card(name):
    """load_card(config.json) builds the same card as the shipped one (all but name, source)."""
    card = load_card(str(CONFIGS / name / "config.json"), text_only=SOURCES[name]["text_only"])
    shipped = registry()[name]
    assert dataclasses.replace(card, name=name, source=shipped.source) == shipped
    assert card.tree == shipped.tree and card.config == shipped.config
    assert total_params(card) == total_params(shipped)


def _lora_cases(names):
    return [(n, t, r) for n in names for t in _specs(n) for r in (8, 16)]


@pytest.mark.parametrize("name,targets,r", _lora_cases([n for n in FAST if n in GENERATED]))
def test_lora_equals_peft(name, targets, r):
    assert lora(name, targets, r) == peft_trainable(name, targets, r)


@pytest.mark.slow
@pytest.mark.parametrize("name,targets,r", _lora_cases([n for n in GENERATED if n not in FAST]))
def test_lora_equals_peft_whole_registry(name, targets, r):
    assert lora(name, targets, r) == peft_trainable(name, targets, r)


def test_default_targets_are_peft_mapping():
    constants = pytest.importorskip("peft.utils.constants")
    theirs = {k: tuple(v) for k, v in constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.items()
              if isinstance(v, list)}
    assert DEFAULT_TARGETS == theirs


def test_no_default_targets_where_peft_has_none():
    card = registry()["qwen3-30b-a3b"]
    with pytest.raises(PlanError, match="no default LoRA targets for model type 'qwen3_moe'"):
        count(card, Plan(method="lora"))


@pytest.mark.parametrize("name,published_total,published_active", [
    ("mixtral-8x7b", 46.7e9, 12.9e9), ("qwen3-30b-a3b", 30.5e9, 3.3e9),
])
def test_moe_total_and_active_match_published(name, published_total, published_active):
    """Published figures are given to 0.1B (Qwen3-30B-A3B: 3.35B computed, "3.3B" published, truncated);
    active counts every parameter a token passes, embeddings included."""
    card = registry()[name]
    assert abs(total_params(card) - published_total) < 0.1e9
    assert abs(active_params(card) - published_active) < 0.1e9


def test_peft_rewrites_mixtral_all_linear_onto_the_fused_experts():
    """peft 0.21 + transformers 5: all-linear reaches Mixtral's router and fused experts as target_parameters."""
    card = registry()["mixtral-8x7b"]
    targets = count(card, Plan(method="lora", targets="all-linear")).targets
    assert set(targets) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                            "mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"}
    assert (card.n_experts, card.experts_per_token, card.expert_d_ff) == (8, 2, 14_336)
    gpt_oss = count(registry()["gpt-oss-20b"], Plan(method="lora", targets="all-linear")).targets
    assert set(gpt_oss) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}
    with pytest.raises(PlanError, match="targets nothing by default on 'mixtral'"):
        count(card, Plan(method="lora"))


def test_moe_rewrite_table_is_peft_s():
    conv = pytest.importorskip("peft.utils.transformers_weight_conversion")
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    from peftplan.planning.moe_targets import FUSED, PEFT_MOE_FAMILY, RENAMES

    theirs = {t: f for t, f in conv._MODEL_TO_CONVERSION_PATTERN.items()
              if f in conv._MOE_TARGET_MODULE_MAPPING and get_checkpoint_conversion_mapping(t) is not None}
    assert {t: f for t, f in PEFT_MOE_FAMILY.items() if get_checkpoint_conversion_mapping(t) is not None} == theirs
    assert RENAMES == conv._MOE_TARGET_MODULE_MAPPING
    assert FUSED == {k: {n: tuple(v) for n, v in d.items()} for k, d in conv._MOE_FUSED_TARGETS.items()}


TINY_MOE = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16),
    "deepseek_v2": dict(n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32,
                        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=16,
                        qk_rope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, layer_types=["sliding_attention",
                                                                                          "full_attention"] * 2),
    "llama4_text": dict(num_local_experts=4, num_experts_per_tok=1, head_dim=16, intermediate_size_mlp=128,
                        interleave_moe_layer_step=2),
}
TINY_TARGETS = {"mixtral": ["all-linear", "q_proj,v_proj", "w1,w3,w2", "w2"],
                "qwen3_moe": ["all-linear", "q_proj,gate_proj,up_proj", "down_proj"],
                "deepseek_v2": ["all-linear", "q_proj,down_proj", "kv_b_proj"],
                "gpt_oss": ["all-linear", "q_proj,v_proj"], "llama4_text": ["all-linear", "q_proj,v_proj"]}


@pytest.mark.parametrize("mt,targets,r", [(mt, t, r) for mt, ts in TINY_TARGETS.items() for t in ts for r in (8, 16)])
def test_tiny_moe_lora_equals_peft(mt, targets, r, tmp_path):
    """Small MoE configs of each rewritten (and one not rewritten) family: ours == peft, or both refuse."""
    peft = pytest.importorskip("peft")
    config = dict(model_type=mt, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=128, **TINY_MOE[mt])
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    card = load_card(str(path))
    from peftplan.build import meta_model

    spec = targets if targets == "all-linear" else targets.split(",")
    try:
        wrapped = peft.get_peft_model(meta_model(card), peft.LoraConfig(r=r, target_modules=spec))
        theirs = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    except ValueError as e:
        theirs = e
    if isinstance(theirs, Exception):
        with pytest.raises(PlanError):
            count(card, Plan(method="lora", r=r, targets=targets))
    else:
        assert count(card, Plan(method="lora", r=r, targets=targets)).trainable == theirs


def test_roles_and_facts():
    qwen = registry()["qwen3-8b"]
    from peftplan.planning.layout import layout

    roles = {x.name: x.role for x in layout(qwen).block_linears}
    assert roles == {"self_attn.q_proj": "attn_in", "self_attn.k_proj": "attn_in", "self_attn.v_proj": "attn_in",
                     "self_attn.o_proj": "attn_out", "mlp.gate_proj": "ffn_in", "mlp.up_proj": "ffn_in",
                     "mlp.down_proj": "ffn_out"}
    assert qwen.qk_norm and not qwen.moe
    assert registry()["falcon-7b"].parallel_block and registry()["falcon-7b"].n_kv_heads == 1
    assert registry()["pythia-1b"].parallel_block
    assert registry()["flan-t5-base"].cross_attention and registry()["flan-t5-base"].task == "seq2seq-lm"
    assert registry()["modernbert-base"].encoder


# ---------------------------------------------------------------- multimodal, tasks


def test_multimodal_whole_model_and_text_only():
    path = str(CONFIGS / "gemma-3-4b" / "config.json")
    whole = load_card(path)
    text = load_card(path, text_only=True)
    assert whole.task == "image-text-to-text" and whole.model_class == "Gemma3ForConditionalGeneration"
    assert text.model_class == "Gemma3ForCausalLM" and text.text_only
    vision = total_params(whole) - total_params(text)
    assert 0.40e9 < vision < 0.44e9  # SigLIP-So400m tower + projector (Gemma 3 report: 417M)
    from peftplan.build import meta_model

    assert sum(p.numel() for p in meta_model(whole).parameters()) == total_params(whole)
    from peftplan.planning import estimate

    assert any("whole Gemma3ForConditionalGeneration" in w for w in estimate(whole, targets="all-linear").warnings)


def test_multimodal_all_linear_reaches_the_vision_tower_like_peft():
    whole = load_card(str(CONFIGS / "gemma-3-4b" / "config.json"))
    from peftplan.planning.layout import layout

    ours = count(whole, Plan(method="lora", r=8, targets="all-linear")).trainable
    peft = pytest.importorskip("peft")
    from peftplan.build import meta_model

    wrapped = peft.get_peft_model(meta_model(whole), peft.LoraConfig(r=8, target_modules="all-linear"))
    assert ours == sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    assert any("vision" in x.name for x in layout(whole).other_linears)


def test_encoder_classification_task():
    card = load_card(str(CONFIGS / "modernbert-base" / "config.json"), task="classification")
    assert card.task == "classification" and card.model_class == "ModernBertForSequenceClassification"
    from peftplan.build import meta_model

    assert sum(p.numel() for p in meta_model(card).parameters()) == total_params(card)


# ---------------------------------------------------------------- cache


def test_cached_card_is_read_without_torch(tmp_path):
    src = CONFIGS / "qwen3-0.6b" / "config.json"
    cfg = tmp_path / "config.json"
    cfg.write_bytes(src.read_bytes())
    env = {"PEFTPLAN_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(Path(__file__).parents[1])}
    code = ("import sys; from peftplan.planning import estimate; e = estimate(sys.argv[1], targets='all-linear'); "
            "print(e.params.base, 'torch' in sys.modules, 'transformers' in sys.modules)")
    # a miss builds on meta: here in-process (the forked worker, which keeps torch out of the caller, is
    # tests/test_cardgen_worker.py's)
    first = subprocess.run([sys.executable, "-c", code, str(cfg)], capture_output=True, text=True,
                           env=dict(env, PEFTPLAN_CARD_WORKER="0"))
    second = subprocess.run([sys.executable, "-c", code, str(cfg)], capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.split() == ["596049920", "True", "True"]
    assert second.stdout.split() == ["596049920", "False", "False"]  # a hit reads TOML only
    assert len(list((tmp_path / "cache").glob("*.toml"))) == 1


# ---------------------------------------------------------------- bad input


def _cli(*args, env_cache):
    import os

    env = dict(os.environ, PEFTPLAN_CACHE=str(env_cache), PYTHONPATH=str(Path(__file__).parents[1]), COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "peftplan", *args], capture_output=True, text=True, env=env)


BAD = {
    "remote": ({"model_type": "my_secret_lm", "auto_map": {"AutoModelForCausalLM": "modeling.MyLM"},
                "hidden_size": 64}, "model type 'my_secret_lm' needs its own code"),
    "heads": ({"model_type": "llama", "hidden_size": 100, "num_attention_heads": 7, "num_hidden_layers": 2,
               "intermediate_size": 64, "vocab_size": 50}, "hidden size 100 is not a multiple of the 7 attention heads"),
    "kv": ({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 3,
            "num_hidden_layers": 2, "intermediate_size": 64, "vocab_size": 50}, "not a multiple of the 3 kv heads"),
    "zero": ({"model_type": "qwen3", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 0,
              "intermediate_size": 64, "vocab_size": 50}, "'num_hidden_layers' must be positive, got 0"),
    "negative": ({"model_type": "mistral", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
                  "intermediate_size": -64, "vocab_size": 50}, "'intermediate_size' must be positive, got -64"),
    "unknown": ({"model_type": "no_such_model", "hidden_size": 64}, "not known to transformers"),
    "no_type": ({"hidden_size": 64}, "has no 'model_type'"),
    "not_object": ([1, 2], "does not hold a JSON object"),
    # transformers' strict validation puts the reason on the line after a header ending in ':'
    "odd_rotary": ({"model_type": "llama", "hidden_size": 4000, "num_attention_heads": 32, "num_hidden_layers": 2,
                    "intermediate_size": 64, "vocab_size": 50}, "RoPE requires an even rotary dimension"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_one_line_exit_2(case, tmp_path):
    config, needle = BAD[case]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    res = _cli("estimate", "-m", str(path), env_cache=tmp_path / "c")
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peftplan: error: ") and needle in lines[0], res.stderr


def test_malformed_and_unreadable_files(tmp_path):
    bad = tmp_path / "bad" / "config.json"
    bad.parent.mkdir()
    bad.write_text("{\"model_type\": \"llama\", ")
    unreadable = tmp_path / "locked" / "config.json"
    unreadable.parent.mkdir()
    unreadable.write_bytes(b"\xff\xfe\x00garbage")
    for path, needle in ((bad, "is not valid JSON"), (unreadable, "is not UTF-8 text"),
                         (tmp_path / "missing", "no config.json"), (tmp_path / "dir.json", "no config.json")):
        res = _cli("estimate", "-m", str(path), env_cache=tmp_path / "c")
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and needle in lines[0], res.stderr
    res = _cli("card", "import", str(tmp_path / "missing"), "-o", str(tmp_path / "x.toml"), env_cache=tmp_path / "c")
    assert res.returncode == 2 and res.stderr.startswith("peftplan: error: ") and "no such file" in res.stderr \
        and res.stderr.count("\n") == 1


def test_native_type_with_auto_map_is_built_by_transformers():
    """DeepSeek-V2-Lite's config.json still carries an auto_map; transformers 5 has the class itself."""
    card = registry()["deepseek-v2-lite"]
    assert "auto_map" in card.config and card.model_class == "DeepseekV2ForCausalLM"


def test_card_import_writes_a_card(tmp_path):
    out = tmp_path / "smol.toml"
    res = _cli("card", "import", str(CONFIGS / "smollm2-135m"), "-o", str(out), "--name", "smol",
               env_cache=tmp_path / "c")
    assert res.returncode == 0, res.stderr
    from peftplan.planning.cards import ModelCard, load_card_file

    card = load_card_file(out, ModelCard, "card")
    shipped = registry()["smollm2-135m"]
    assert card.generated and dataclasses.replace(card, name=shipped.name, source=shipped.source) == shipped


def test_models_lists_families_with_total_and_active(tmp_path):
    res = _cli("models", "--json", env_cache=tmp_path / "c")
    assert res.returncode == 0, res.stderr
    rows = {m["name"]: m for m in json.loads(res.stdout)}
    assert set(SOURCES) <= set(rows)
    mixtral = rows["mixtral-8x7b"]
    assert (mixtral["family"], mixtral["params"]) == ("mixtral", total_params(registry()["mixtral-8x7b"]))
    assert mixtral["active_params"] == active_params(registry()["mixtral-8x7b"]) < mixtral["params"]
    assert rows["qwen3-8b"]["active_params"] == rows["qwen3-8b"]["params"]
    assert rows["gemma-3-4b"]["family"] == "gemma3"
    table = _cli("models", env_cache=tmp_path / "c").stdout
    assert "qwen3_moe" in table and "mixtral" in table


# ---------------------------------------------------------------- facts read from the classes


def test_norm_glu_and_positions_are_the_classes():
    """ModernBERT: nn.LayerNorm without bias and a GLU chunked from Wi; DeBERTa-v2: relative attention and no
    rotary module; T5's bias-free T5LayerNorm and Llama's RMSNorm: RMSNorms. Held to the transformers classes
    on meta, not to our cards."""
    torch = pytest.importorskip("torch")
    bert, model = registry()["modernbert-base"], meta("modernbert-base")
    norms = [m for n, m in model.named_modules() if n.startswith("model.layers.") and n.endswith("_norm")
             and not isinstance(m, torch.nn.Identity)]  # block 0 has no attention norm
    assert norms and all(isinstance(m, torch.nn.LayerNorm) and m.bias is None for m in norms)
    mlp = model.model.layers[0].mlp
    assert mlp.Wi.out_features == 2 * mlp.Wo.in_features == 2 * bert.d_ff  # input, gate = Wi(x).chunk(2)
    assert (bert.norm, bert.gated_mlp) == ("layernorm", True)
    deberta, dmodel = registry()["deberta-v3-base"], meta("deberta-v3-base")
    assert dmodel.config.relative_attention and not dmodel.config.position_biased_input
    assert not any("rotary" in type(m).__name__.lower() for m in dmodel.modules())
    assert deberta.positions == "relative"
    t5 = meta("flan-t5-base")
    assert type(t5.decoder.block[0].layer[0].layer_norm).__name__ == "T5LayerNorm"
    assert registry()["flan-t5-base"].norm == registry()["qwen3-0.6b"].norm == "rmsnorm"
    assert registry()["pythia-1b"].norm == "layernorm" and not registry()["pythia-1b"].gated_mlp


def test_modernbert_terms_read_the_card_facts():
    """families.py's ModernBERT terms follow the card (a bias-free LayerNorm encoder, a chunked GLU), not a
    family-name list: the same card saying RMSNorm / ungated gets none of them; no other card gets them."""
    from peftplan.planning import families

    card = registry()["modernbert-base"]
    assert families.biasless_layernorm_encoder(card) and families.chunked_glu(card)
    assert not families.biasless_layernorm_encoder(dataclasses.replace(card, norm="rmsnorm"))
    assert not families.chunked_glu(dataclasses.replace(card, gated_mlp=False))
    others = [c for n, c in registry().items() if n != "modernbert-base"]
    assert not any(families.biasless_layernorm_encoder(c) for c in others)
    assert {c.name for c in others if families.chunked_glu(c)} <= {"phi-4", "phi-3-mini"}  # fused gate_up_proj
