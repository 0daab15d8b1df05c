"""MoE step FLOPs (router, grouped-GEMM experts, shared experts, peft's merged expert stacks) against the
fake-tensor trace's counted matmuls, on cut cards of Mixtral, Qwen3-MoE, DeepSeek-V2 and gpt-oss."""
from __future__ import annotations

import pytest

from peftplan.plan import Plan
from peftplan.planning import timing
from peftplan.planning.cards import load_card
from peftplan.trace.random_check import cut

MODELS = ("mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v2-lite", "gpt-oss-20b")
METHODS = (("full", None), ("top", None), ("lora", "q_proj,v_proj"), ("lora", "all-linear"))


def _per_group_mm(a, b, offs, layout):
    """The grouped product as one torch.mm per expert group (the counter sees aten.mm, 2·m·n·k each)."""
    import torch

    start, outs = 0, []
    ends = offs.tolist() if offs is not None else range(1, a.shape[0] + 1)
    for g, end in enumerate(ends):
        if layout == "2x3":
            outs.append(torch.mm(a[start:end], b[g]))
        elif layout == "2x2":
            outs.append(torch.mm(a[:, start:end], b[start:end]))
        elif layout == "3x2":
            outs.append(torch.mm(a[g], b[:, start:end]))
        else:
            outs.append(torch.mm(a[g], b[g]))
        start = end
    return outs


@pytest.mark.parametrize("layout", ["2x3", "2x2", "3x2", "3x3"])
def test_grouped_mm_counted_as_its_groups(layout):
    """torch._grouped_mm (the experts' kernel, forward, input and weight gradients) counts what one mm per
    expert group counts, in each of its four layouts (offs splitting rows, the inner dimension or columns)."""
    import torch

    from peftplan.trace.flops import MatmulCounter

    bf = torch.bfloat16
    offs = torch.tensor([8, 8, 24, 32], dtype=torch.int32)
    a, b = {"2x3": (torch.randn(32, 16), torch.randn(4, 16, 24)),
            "2x2": (torch.randn(32, 16).t(), torch.randn(32, 24)),
            "3x2": (torch.randn(4, 16, 16), torch.randn(32, 16).t()),
            "3x3": (torch.randn(4, 8, 16), torch.randn(4, 24, 16).transpose(1, 2))}[layout]
    a, b = a.to(bf), b.to(bf)
    grouped, loop = MatmulCounter(), MatmulCounter()
    with grouped:
        torch._grouped_mm(a, b, offs=None if layout == "3x3" else offs)
    with loop:
        _per_group_mm(a, b, None if layout == "3x3" else offs, layout)
    assert grouped.by_phase["setup"] == loop.by_phase["setup"] > 0


def _case(model: str, method: str, targets: str | None, ck: bool, blocks: int = 1):
    from peftplan.trace.flops import trace_flops

    card = cut(load_card(model), blocks + (model == "deepseek-v2-lite"))  # its block 0 is dense
    attention = "eager" if model == "gpt-oss-20b" else "sdpa"  # gpt-oss has no SDPA path in transformers 5
    plan = Plan(method=method, targets=targets, top_k=1, batch_size=2, seq_len=16, grad_checkpointing=ck,
                attention=attention)
    traced = trace_flops(card, plan, impl="auto")  # peft builds LoRA on fused experts (ParamWrapper)
    f = timing.step_flops(card, plan)
    predicted = f.matmul + (f.attention if attention == "eager" else 0)
    return predicted, traced


@pytest.mark.parametrize("ck", [False, True])
@pytest.mark.parametrize("method,targets", METHODS)
@pytest.mark.parametrize("model", MODELS)
def test_moe_flops_match_trace(model, method, targets, ck):
    """1-block cuts (DeepSeek-V2: its dense block 0 and one MoE block), b 2, s 16, equal to the traced count
    (the grouped GEMM has S = k·b·s rows whatever the routing): routers, experts, shared experts, peft's merged
    stacks (LoRA all-linear), checkpoint recomputation."""
    predicted, traced = _case(model, method, targets, ck)
    assert predicted == traced.total and traced.optimizer == 0


def test_moe_flops_blocks_above_the_lowest():
    """Two MoE blocks, LoRA on q, v without checkpointing: the lower block's experts get input gradients, not
    its q/k/v; top-1 of two: only the upper block has a backward."""
    for model in ("qwen3-30b-a3b", "deepseek-v2-lite"):
        for method, targets in (("lora", "q_proj,v_proj"), ("top", None)):
            predicted, traced = _case(model, method, targets, False, blocks=2)
            assert predicted == traced.total, (model, method)


@pytest.mark.parametrize("model", MODELS)
def test_moe_forward_counts_the_active_weights(model):
    """Full card, full fine-tuning: the forward's matmul FLOPs per token are 2 × the weights one token
    multiplies in the transformers model built on meta: every Linear (attention, shared experts, dense MLPs,
    the head; the embedding lookup is no matmul), every 2-D router weight, and k/E of each fused (E, ·, ·)
    expert stack (k of its E experts per token)."""
    import torch

    from peftplan.build import meta_model

    card = load_card(model)
    net = meta_model(card)
    k, E = card.experts_per_token, card.n_experts
    active = sum(m.weight.numel() for m in net.modules() if isinstance(m, torch.nn.Linear))
    for name, p in net.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if p.dim() == 3 and leaf in ("gate_up_proj", "down_proj"):
            active += p.numel() * k // E
        elif p.dim() == 2 and name.endswith(("mlp.gate.weight", "mlp.router.weight")):
            active += p.numel()
    f = timing.step_flops(card, Plan(method="full", batch_size=1, seq_len=64))
    assert f.forward == 2 * f.tokens * active, (model, f.forward / f.tokens / 2, active)
