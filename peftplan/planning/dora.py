"""DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", §4.3) as peft 0.21 runs it.

peft `tuners/lora/variants.py::DoraLinearVariant.forward` and `tuners/lora/dora.py::DoraLinearLayer.forward`, per
wrapped Linear W (d_out × d_in), on x (the input peft cast to the adapter dtype; QLoRA under autocast: uncast):

    lora_weight = lora_B(lora_A(eye(d_in))).T            # eye d_in², A·eye, B·A: d_in·d_out   (adapter dtype)
    weight      = dequantize(W).to(x.dtype)              # a copy unless W is already x's dtype (4-bit: always)
    norm        = ‖weight + scaling·lora_weight‖ row-wise  # scaling·lora_weight and the sum: 2·d_in·d_out
    m_scale     = magnitude / norm.detach()              # magnitude: d_out, trainable (adapter dtype)
    result     += (m_scale − 1)·base_result + m_scale·lora_B(lora_A(x))·scaling

The weight norm is detached and lora_weight's own graph reaches no loss, so the d_in² and d_in·d_out tensors
are transient: they live while the module runs (in forward, and again in a checkpointed block's recomputation)
and peak at the add inside the norm. Saved for backward, per token: base_result (for the magnitude's gradient)
and lora_B's output (for m_scale's); per module: the detached norm, m_scale and, when base_result needs a
gradient (not in the lowest trained block of a frozen base), m_scale − 1. With LoRA dropout peft recomputes
base_result = F.linear(dropout(x), weight) in x's dtype, which also saves that weight (when x needs a gradient).
Pure Python: no torch.
"""
from __future__ import annotations

from dataclasses import replace

from peftplan.plan import DTYPES, Plan
from peftplan.planning.cards import ModelCard
from peftplan.planning.layout import layout
from peftplan.planning.params import ParamCounts, lora_block_sets, lora_targets

FP32 = 4
ROUND = 512  # the caching allocator's block


def _rounded(n: int) -> int:
    return max(ROUND, -(-n // ROUND) * ROUND)


def magnitudes(card: ModelCard, plan: Plan) -> list[int]:
    """numel of each magnitude vector (one of d_out per wrapped Linear); [] without DoRA."""
    if not plan.use_dora:
        return []
    return [lin.d_out for lin, _, copies in lora_targets(card, plan.targets) for _ in range(copies)]


def with_magnitudes(card: ModelCard, plan: Plan, p: ParamCounts) -> ParamCounts:
    """The parameter counts with DoRA's magnitude vectors added to the trainable (added) parameters."""
    n = sum(magnitudes(card, plan))
    return replace(p, added=p.added + n, trainable=p.trainable + n) if n else p


def _x_bytes(card: ModelCard, plan: Plan, lin) -> int:
    """Element bytes of x as DoRA receives it in the Linear `lin`. peft's lora.Linear casts x to the adapter dtype;
    its bitsandbytes twin skips that cast under autocast, so x stays what reaches the Linear4bit: the norm's
    output for the Linears reading it (fp32 where autocast runs LayerNorm in fp32, or after k-bit preparation),
    the attention output (the autocast dtype) for the output projection, and for the FFN's output projection
    what the FFN's input projections return (a Linear4bit returns its input's dtype)."""
    a = DTYPES[plan.adapter_dtype]
    if not (plan.method == "qlora" and plan.autocast != "none"):
        return a
    ac = DTYPES[plan.autocast]
    if lin.role == "attn_out":
        return ac
    normed = FP32 if card.norm == "layernorm" or plan.kbit_prep else plan.bytes_per_element
    return normed if lin.role in ("attn_in", "ffn_in", "ffn_out") else ac


def _dtypes(card: ModelCard, plan: Plan, lin) -> tuple[int, int, int]:
    """(adapter element, DoRA input x element, base_result element) bytes for the wrapped Linear `lin`."""
    a = DTYPES[plan.adapter_dtype]
    ac = DTYPES[plan.autocast] if plan.autocast != "none" else 0
    x = _x_bytes(card, plan, lin)
    if plan.method == "qlora":
        base = x if ac else (FP32 if plan.kbit_prep else plan.bytes_per_element)  # Linear4bit: its input's dtype
    else:
        base = ac or plan.bytes_per_element
    if plan.dropout:  # base_result is recomputed, F.linear(dropout(x), weight in x's dtype)
        base = ac or x
    return a, x, base


def _weight_copied(card: ModelCard, plan: Plan, lin) -> bool:
    """Is the weight in x's dtype a new tensor: a 4-bit weight is dequantized, another one is cast unless it is
    in x's dtype already."""
    return plan.method == "qlora" or _x_bytes(card, plan, lin) != plan.bytes_per_element


def saved_weight_bytes(card: ModelCard, plan: Plan, lin) -> int:
    """Bytes per weight element that peft's recomputed base output (LoRA dropout) saves beyond the frozen
    weight: the weight in x's dtype when that is a copy; under autocast the autocast-dtype copy F.linear makes
    (none when that copy is the weight itself)."""
    x = _x_bytes(card, plan, lin)
    ac = DTYPES[plan.autocast] if plan.autocast != "none" else 0
    copied = _weight_copied(card, plan, lin)
    if ac:
        return ac if (x != ac or copied) else 0
    return x if copied else 0


def block_saved_per_token(card: ModelCard, plan: Plan, wrapped: frozenset[str], first: bool) -> float:
    """Bytes per token DoRA saves in one block beyond vanilla LoRA: base_result and lora_B's output per wrapped
    Linear (the per-module vectors spread over the tokens, so blocks stay per-token figures)."""
    if not plan.use_dora:
        return 0.0
    ac = DTYPES[plan.autocast] if plan.autocast != "none" else 0
    total = 0.0
    for lin in layout(card).block_linears:
        if lin.name in wrapped:
            a, _, base = _dtypes(card, plan, lin)
            total += (base + (ac or a)) * lin.d_out  # base_result, lora_B's output
            per_module = (2 if first else 3) * _rounded(FP32 * lin.d_out)
            if plan.dropout and not first:
                per_module += _rounded(saved_weight_bytes(card, plan, lin) * lin.d_in * lin.d_out)
            total += per_module / plan.tokens
    return total


def blocks_saved(card: ModelCard, plan: Plan, blocks: list[float]) -> list[float]:
    """`blocks` (per-token saved bytes of the trained blocks, lowest first) plus DoRA's share of each."""
    if not plan.use_dora or not blocks:
        return blocks
    sets = lora_block_sets(card, plan.targets)[-len(blocks):]
    # checkpointed, transformers makes the embedding output require grad (enable_input_require_grads): no block
    # is then `first`
    return [v + block_saved_per_token(card, plan, sets[i], i == 0 and not plan.grad_checkpointing)
            for i, v in enumerate(blocks)]


def transient_bytes(card: ModelCard, plan: Plan, eye: bool = True) -> int:
    """The largest wrapped block Linear's weight-norm working set, at the larger of two moments:
    computing lora_weight = B(A(eye)): the eye (adapter dtype; under autocast also its autocast-dtype copy),
    A·eye and B's d_in×d_out output; and the add inside the norm: the eye lora_A saved (under autocast its copy;
    the eye itself is freed on return), A·eye, lora_weight in x's dtype, the base weight in x's dtype (a copy
    unless it already is; a 4-bit weight is always dequantized), scaling·lora_weight and the sum.
    eye=False: a checkpointed forward, whose saved-tensor hooks keep nothing of lora_weight's graph."""
    if not plan.use_dora:
        return 0
    ac = DTYPES[plan.autocast] if plan.autocast != "none" else 0
    best = 0
    for lin, in_block, _ in lora_targets(card, plan.targets):
        if not in_block:
            continue
        a, x, _ = _dtypes(card, plan, lin)
        lw = ac or a  # lora_A(eye) and lora_B's output
        n, sq = lin.d_in * lin.d_out, lin.d_in * lin.d_in
        a_eye = _rounded(lw * plan.r * lin.d_in)
        making = (eye * (_rounded(a * sq) + (_rounded(ac * sq) if ac and ac != a else 0)) + a_eye
                  + _rounded(lw * n))
        adding = (eye * _rounded(lw * sq) + a_eye + _rounded(x * n)
                  + (2 + _weight_copied(card, plan, lin)) * _rounded(x * n))
        best = max(best, making, adding)
    return best


def moments(card: ModelCard, plan: Plan, st, act, grads_late: int, fwd, bwd):
    """(forward, backward) with the weight-norm working set's moments added where they are larger:
    forward, the top block's largest wrapped Linear running over what the blocks saved (checkpointed: every
    block's kept input); checkpointed backward, the same module recomputed, once before any gradient
    (every kept input) and once in the lowest trained block (the other blocks' gradients written, that block's
recomputed saved tensors beside it).
    `st`, `act`: memory.Static and memory.Activations; `grads_late`: gradients present when the lowest trained
    block runs backward (all of them under gradient accumulation)."""
    from peftplan.planning.memory import _memory

    tr = transient_bytes(card, plan)
    if not tr:
        return fwd, bwd
    accum = st.gradients_bytes if plan.grad_accum > 1 else 0
    inputs = act.saved_bytes - act.outside_bytes  # the top block's own share is mostly saved by then
    fwd_tr = transient_bytes(card, plan, eye=not plan.grad_checkpointing)
    cands = [_memory("forward", st, activations_bytes=inputs, temporaries_bytes=fwd_tr, gradients_bytes=accum)]
    fwd = max([fwd, *cands], key=lambda m: m.tensor_bytes)
    if plan.grad_checkpointing:
        cands = [_memory("backward", st, activations_bytes=inputs, temporaries_bytes=tr, gradients_bytes=accum),
                 _memory("backward", st, activations_bytes=act.checkpoint_bytes + act.first_block_bytes,
                         temporaries_bytes=tr, gradients_bytes=max(accum, grads_late))]
        bwd = max([bwd, *cands], key=lambda m: m.tensor_bytes)
    return fwd, bwd
