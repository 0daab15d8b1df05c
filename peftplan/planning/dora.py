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


def _dtypes(plan: Plan) -> tuple[int, int, int]:
    """(adapter element, DoRA input x element, base_result element) bytes."""
    a = DTYPES[plan.adapter_dtype]
    ac = DTYPES[plan.autocast] if plan.autocast != "none" else 0
    base = ac or (FP32 if plan.method == "qlora" and plan.kbit_prep else plan.bytes_per_element)
    x = base if plan.method == "qlora" and ac else a  # bnb's LoRA skips the input cast under autocast
    return a, x, base


def block_saved_per_token(card: ModelCard, plan: Plan, wrapped: frozenset[str], first: bool) -> float:
    """Bytes per token DoRA saves in one block beyond vanilla LoRA: base_result and lora_B's output per wrapped
    Linear (the per-module vectors spread over the tokens, so blocks stay per-token figures)."""
    if not plan.use_dora:
        return 0.0
    a, x, base = _dtypes(plan)
    ac = DTYPES[plan.autocast] if plan.autocast != "none" else 0
    out = ac or a  # lora_B's output
    if plan.dropout:  # base_result is recomputed, F.linear(dropout(x), weight in x's dtype): it saves that weight
        base = ac or x
    total = 0.0
    for lin in layout(card).block_linears:
        if lin.name in wrapped:
            total += (base + out) * lin.d_out
            per_module = (2 if first else 3) * _rounded(FP32 * lin.d_out)
            if plan.dropout and not first:
                per_module += _rounded((ac or x) * lin.d_in * lin.d_out)
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
    """The largest wrapped block Linear's weight-norm working set, live at the add inside the norm: eye(d_in),
    A·eye, lora_weight, the base weight in x's dtype (a copy unless it already is; a 4-bit weight is always
    dequantized), scaling·lora_weight and the sum. eye=False: a checkpointed forward, whose saved-tensor hooks
    drop lora_A's saved input (the eye) at once."""
    if not plan.use_dora:
        return 0
    a, x, _ = _dtypes(plan)
    copy = plan.method == "qlora" or x != plan.bytes_per_element
    best = 0
    for lin, in_block, _ in lora_targets(card, plan.targets):
        if not in_block:
            continue
        n = lin.d_in * lin.d_out
        v = (eye * _rounded(a * lin.d_in * lin.d_in) + _rounded(a * plan.r * lin.d_in) + _rounded(a * n)
             + (2 + copy) * _rounded(x * n))
        best = max(best, v)
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
