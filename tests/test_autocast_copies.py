"""planning/autocast_copies.py and planning/dequant.py held to the transformers modules they describe (meta
models: shapes only) and to the fake-tensor trace (tests/test_check_random.py, KINDS: the kinds they fix)."""
from __future__ import annotations

import pytest

from peftplan.plan import Plan
from peftplan.planning.autocast_copies import attention_reads_block_input, down_copy_freed_bytes
from peftplan.planning.cards import load_card
from peftplan.planning.dequant import quiet_block_ffn_backward, top_is_lowest
from peftplan.trace.random_check import cut

torch = pytest.importorskip("torch")

# the FFN output Linear of block 0, by model type (transformers' module names)
DOWN = {"opt": "fc2", "llama": "mlp.down_proj", "falcon": "mlp.dense_4h_to_h", "gpt2": "mlp.c_proj",
        "olmo2": "mlp.down_proj"}


def _block0(name: str):
    from peftplan.build import meta_model
    from peftplan.planning.layout import layout

    card = cut(load_card(name), 1)
    model = meta_model(card)
    return card, model.get_submodule(f"{layout(card).block_prefix}.0")


@pytest.mark.parametrize("name", ["opt-6.7b", "llama-2-7b", "falcon-7b", "gpt2", "olmo-2-7b"])
def test_down_copy_is_the_ffn_output_weight_in_the_autocast_dtype(name):
    card, block = _block0(name)
    down = block.get_submodule(DOWN[card.model_type])
    numel = down.weight.numel() + (down.bias.numel() if getattr(down, "bias", None) is not None else 0)
    for ac, size in (("fp16", 2), ("bf16", 2)):
        for method in ("full", "top"):
            assert down_copy_freed_bytes(card, Plan(method=method, top_k=1, dtype="fp32", autocast=ac)) == size * numel
    # no copies: weights already in the autocast dtype, no autocast, or a frozen base (LoRA)
    assert down_copy_freed_bytes(card, Plan(method="full", dtype="bf16", autocast="bf16")) == 0
    assert down_copy_freed_bytes(card, Plan(method="full", dtype="fp32")) == 0
    assert down_copy_freed_bytes(card, Plan(method="lora", dtype="fp32", autocast="bf16")) == 0


@pytest.mark.parametrize("name, reads", [("olmo-2-7b", True), ("bert-base", True), ("opt-350m", True),
                                         ("llama-2-7b", False), ("opt-6.7b", False), ("gpt2", False),
                                         ("falcon-7b", False), ("gemma-2-2b", False)])
def test_attention_reads_block_input_matches_the_module_tree(name, reads):
    """Pre-norm blocks have a norm module that runs before attention (transformers: input_layernorm, ln_1,
    self_attn_layer_norm with do_layer_norm_before); OLMo-2's and post-norm blocks do not."""
    card, block = _block0(name)
    pre = {"input_layernorm", "ln_1", "ln_attn"}
    has_pre = any(hasattr(block, n) for n in pre) or (
        card.model_type == "opt" and getattr(block, "do_layer_norm_before", False))
    assert attention_reads_block_input(card) is reads
    assert has_pre is not reads


def test_quiet_block_dequantizes_only_where_an_input_needs_a_gradient():
    card = cut(load_card("llama-2-7b"), 1)
    plan = Plan(method="qlora", targets="down_proj", seq_len=16)
    # LoRA on the down projection alone: no Linear4bit of the block reads an input needing a gradient
    assert quiet_block_ffn_backward(card, plan, 2, 7) == 7
    assert top_is_lowest(card, plan)
    # on the up projection: the down projection's input needs one; its weight (4096 × 11008, bf16) is dequantized
    up = quiet_block_ffn_backward(card, Plan(method="qlora", targets="up_proj", seq_len=16), 2, 7)
    assert up >= 2 * 4096 * 11008
    # not quiet: checkpointed (every input needs a gradient), or not QLoRA
    assert quiet_block_ffn_backward(card, Plan(method="qlora", grad_checkpointing=True), 2, 7) is None
    assert quiet_block_ffn_backward(card, Plan(method="lora"), 2, 7) is None
    assert not top_is_lowest(cut(load_card("llama-2-7b"), 2), plan)
