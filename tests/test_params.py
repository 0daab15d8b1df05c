"""Exact parameter accounting against peft, bitsandbytes and the papers' worked numbers."""
import math
from functools import cache

import pytest

from peftplan.planning.cards import registry
from peftplan.errors import PlanError
from peftplan.planning.params import adapter_params, count, lora_params, nf4_bits_per_weight, nf4_bytes
from peftplan.plan import Plan

CARDS = sorted(registry())
# generated cards (and phi3, which peft gives no default) are held to peft in tests/test_cardgen.py
LORA_CARDS = [n for n in CARDS if registry()[n].model_type != "phi3" and not registry()[n].generated]


def test_seed_worked_example():
    # d = 4096, r = 16: 131,072 LoRA parameters for one d×d matrix, 0.78% of 16,777,216
    n = lora_params(4096, 4096, 16)
    assert n == 131_072
    assert round(100 * n / 4096**2, 2) == 0.78


def test_known_figures():
    assert count(registry()["opt-6.7b"], Plan(method="full")).total == 6_658_473_984
    assert count(registry()["llama-2-7b"], Plan(method="full")).total == 6_738_415_616
    assert count(registry()["opt-6.7b"], Plan(method="lora", r=16)).trainable == 8_388_608


def test_nf4_bits():
    assert nf4_bits_per_weight(True) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))
    assert nf4_bits_per_weight(False) == 4.5
    assert nf4_bytes(4096 * 4096) == 8_655_940  # NOTES.md: measured bitsandbytes storage


def test_nf4_bytes_equal_bitsandbytes():
    torch = pytest.importorskip("torch")
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(4096, 4096, dtype=torch.bfloat16)
    for dq in (True, False):
        packed, qs = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4")
        tensors = [packed, qs.absmax, qs.code]
        if dq:
            tensors += [qs.state2.absmax, qs.state2.code, qs.offset]
        stored = sum(t.numel() * t.element_size() for t in tensors)
        assert stored == nf4_bytes(4096 * 4096, dq)


@pytest.mark.parametrize("name", CARDS)
def test_adapter_counts(name):
    card = registry()[name]
    m = max(1, card.d_model // 64)
    p = count(card, Plan(method="adapter", adapter_size=m))
    assert p.added == card.n_layers * 2 * (2 * m * card.d_model + card.d_model + m)
    one = count(card, Plan(method="adapter", adapter_size=m, adapter_placement="ffn"))
    assert one.added == p.added // 2
    assert adapter_params(card.d_model, m) == 2 * m * card.d_model + card.d_model + m


@cache
def _peft_meta(name: str, targets: str | None, r: int) -> tuple[int, int]:
    import torch
    from peft import LoraConfig, get_peft_model

    from peftplan.build import meta_model

    card = registry()[name]
    model = meta_model(card)
    cfg = LoraConfig(r=r, lora_alpha=16, target_modules=targets)
    with torch.device("meta"):
        pm = get_peft_model(model, cfg)
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    total = sum(p.numel() for p in pm.parameters())
    return trainable, total


@pytest.mark.parametrize("name", LORA_CARDS)
@pytest.mark.parametrize("targets", [None, "all-linear"])
def test_lora_equals_peft_every_card(name, targets):
    pytest.importorskip("peft")
    trainable, total = _peft_meta(name, targets, 16)
    p = count(registry()[name], Plan(method="lora", r=16, targets=targets))
    assert (p.trainable, p.total) == (trainable, total)


@pytest.mark.parametrize("name", ["opt-6.7b", "llama-2-7b", "gpt2", "bert-base", "qwen2.5-0.5b"])
@pytest.mark.parametrize("targets", [None, "all-linear"])
@pytest.mark.parametrize("r", [1, 8, 64])
def test_lora_ranks_equal_peft(name, targets, r):
    pytest.importorskip("peft")
    trainable, _ = _peft_meta(name, targets, r)
    assert count(registry()[name], Plan(method="lora", r=r, targets=targets)).trainable == trainable


def test_llama2_all_linear_note():
    # NOTES.md: Llama-2-7b all-linear r=16 = 16·32·(4·8192 + 3·(4096+11008))
    p = count(registry()["llama-2-7b"], Plan(method="lora", r=16, targets="all-linear"))
    assert p.trainable == 39_976_960 == 16 * 32 * (4 * 8192 + 3 * (4096 + 11008))


def test_qlora_quantizes_block_linears():
    card = registry()["llama-2-7b"]
    p = count(card, Plan(method="qlora"))
    # every block Linear: 32 × (4·4096² + 3·4096·11008)
    assert p.quantized == 32 * (4 * 4096**2 + 3 * 4096 * 11008)
    assert p.quantized_tensors == 32 * 7


def test_top_k():
    card = registry()["bert-base"]
    p = count(card, Plan(method="top", top_k=2))
    per_block = 4 * (768 * 768 + 768) + 2 * (768 * 3072) + 3072 + 768 + 2 * 2 * 768
    assert p.trainable == 2 * per_block


@pytest.mark.parametrize("plan, needle", [
    (dict(method="lora", r=0), "rank"),
    (dict(method="lora", r=5000), "exceeds"),
    (dict(method="lora", targets="nope"), "match no Linear"),
    (dict(method="adapter", adapter_size=0), "adapter size"),
    (dict(method="lora", batch_size=0), "batch"),
    (dict(method="lora", seq_len=-1), "sequence"),
])
def test_bad_input(plan, needle):
    with pytest.raises(PlanError, match=needle):
        count(registry()["opt-125m"], Plan(**plan))


def test_phi3_has_no_default_targets():
    with pytest.raises(PlanError, match="no default LoRA targets"):
        count(registry()["phi-3-mini"], Plan(method="lora"))
    p = count(registry()["phi-3-mini"], Plan(method="lora", targets="qkv_proj,o_proj"))
    assert p.trainable == 32 * 16 * ((3072 + 3 * 3072) + (3072 + 3072))


def test_regex_targets():
    card = registry()["llama-2-7b"]
    a = count(card, Plan(method="lora", targets=r"re:.*\.(q_proj|v_proj)"))
    b = count(card, Plan(method="lora"))
    assert a.trainable == b.trainable
    assert math.isclose(a.trainable_percent, b.trainable_percent)
