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
from peftplan.planning import seq2seq
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


def _x_bytes(card: ModelCard, plan: Plan, lin, top: bool = False) -> int:
    """Element bytes of x as DoRA receives it in the Linear `lin`. peft's lora.Linear casts x to the adapter dtype;
    its bitsandbytes twin skips that cast under autocast, so x stays what reaches the Linear4bit: the norm's
    output for the Linears reading it (fp32 where autocast runs LayerNorm in fp32, or after k-bit preparation),
    the attention output (the autocast dtype) for the output projection, and for the FFN's output projection
    what the FFN's input projections return (a Linear4bit returns its input's dtype); fp32 where a DoRA module
    upstream promoted it (`_promoted`; `top`: in the top trained block)."""
    a = DTYPES[plan.adapter_dtype]
    if not (plan.method == "qlora" and plan.autocast != "none"):
        return a
    ac = DTYPES[plan.autocast]
    if _promoted(card, plan, lin, top):
        return FP32
    if lin.role == "attn_out":
        return ac
    normed = FP32 if card.norm == "layernorm" or plan.kbit_prep else plan.bytes_per_element
    return normed if lin.role in ("attn_in", "ffn_in", "ffn_out") else ac


def _promoted(card: ModelCard, plan: Plan, lin, top: bool) -> bool:
    """QLoRA under autocast with DoRA: is the Linear `lin`'s input fp32 because a DoRA module upstream returned
    fp32? DoRA's fp32 magnitude scale promotes its sum, and peft's 4-bit twin casts nothing back under autocast
    (`requires_conversion = not torch.is_autocast_enabled()`, peft tuners/lora/bnb.py); a Linear4bit returns its
    input's dtype, so the promotion flows on: the FFN's output projection reads the product of promoted input
    projections; in the top trained block (`top`, with a trained block below) the residual stream itself is
    fp32 once an attention output or FFN Linear below was wrapped (the attention kernel casts q, k, v back to
    the autocast dtype), and so is what its norm (RMSNorm returns its input's dtype) hands on."""
    if not (plan.use_dora and plan.method == "qlora" and plan.autocast != "none"):
        return False
    sets = lora_block_sets(card, plan.targets)
    roles = {x.role for x in layout(card).block_linears if x.name in (sets[-1] if sets else ())}
    if lin.role == "ffn_out" and "ffn_in" in roles:
        return True
    if lin.role not in ("attn_in", "ffn_in"):
        return False
    below = top and sum(bool(w) for w in sets) > 1 and bool(roles & {"attn_out", "ffn_in", "ffn_out"})
    return below or (lin.role == "ffn_in" and "attn_out" in roles and not card.parallel_block)


def _dtypes(card: ModelCard, plan: Plan, lin, top: bool = False) -> tuple[int, int, int]:
    """(adapter element, DoRA input x element, base_result element) bytes for the wrapped Linear `lin`."""
    a = DTYPES[plan.adapter_dtype]
    ac = DTYPES[plan.autocast] if plan.autocast != "none" else 0
    x = _x_bytes(card, plan, lin, top)
    if plan.method == "qlora":
        base = x if ac else (FP32 if plan.kbit_prep else plan.bytes_per_element)  # Linear4bit: its input's dtype
    else:
        base = ac or plan.bytes_per_element
    if plan.dropout:  # base_result is recomputed, F.linear(dropout(x), weight in x's dtype)
        base = ac or x
    elif lin.bias:  # peft saves base_result - bias, promoted to the bias's dtype (fp32 under mixed precision)
        base = max(base, FP32 if plan.method == "qlora" and plan.kbit_prep else plan.bytes_per_element)
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


def module_saved_bytes(card: ModelCard, plan: Plan, lin, first: bool) -> float:
    """Bytes DoRA saves for backward in one wrapped Linear over the step's tokens: base_result and lora_B's output
    (per token), the detached norm, the magnitude scale and (not `first`) m_scale − 1, and with LoRA dropout the
    weight copy F.linear saves (not `first`: its input needs a gradient)."""
    ac = DTYPES[plan.autocast] if plan.autocast != "none" else 0
    a, _, base = _dtypes(card, plan, lin)
    total = (base + (ac or a)) * lin.d_out * plan.tokens + (2 if first else 3) * _rounded(FP32 * lin.d_out)
    if plan.dropout and not first:
        total += _rounded(saved_weight_bytes(card, plan, lin) * lin.d_in * lin.d_out)
    return total


def block_saved_per_token(card: ModelCard, plan: Plan, wrapped: frozenset[str], first: bool) -> float:
    """Bytes per token DoRA saves in one block beyond vanilla LoRA (`module_saved_bytes` of each wrapped Linear,
    the per-module vectors spread over the tokens, so blocks stay per-token figures). `first`: the block's input
    needs no gradient — a Linear is then `first` up to the group of the first wrapped one (`_input_has_grad`)."""
    if not plan.use_dora:
        return 0.0
    return sum(module_saved_bytes(card, plan, lin, first and not _input_has_grad(lin, wrapped, card))
               for lin in layout(card).block_linears if lin.name in wrapped) / plan.tokens


ROLES = ("attn_in", "attn_out", "ffn_in", "ffn_out")  # a block's Linears in forward order


def _input_has_grad(lin, wrapped: frozenset[str], card: ModelCard) -> bool:
    """In a block whose input needs no gradient: does `lin`'s input need one? Only once a wrapped Linear of an
    earlier group ran (its LoRA output needs a gradient and flows on). In a parallel block (GPT-J, GPT-NeoX,
    Falcon) the FFN reads the block's input, so only a wrapped FFN input projection gives its output projection
    a gradient (`families.ffn_input_grad`)."""
    order = {x.name: ROLES.index(x.role) if x.role in ROLES else 0 for x in layout(card).block_linears}
    if card.parallel_block and lin.role in ("ffn_in", "ffn_out"):
        wrapped = frozenset(n for n in wrapped if order.get(n, 0) >= ROLES.index("ffn_in"))
    first = min((order[n] for n in wrapped if n in order), default=len(ROLES))
    return order.get(lin.name, 0) > first


def _first_in_blocks(plan: Plan) -> bool:
    """Is the lowest trained block's input free of gradient? Checkpointed, transformers makes the embedding output
    require grad (enable_input_require_grads)."""
    return not plan.grad_checkpointing


def blocks_saved(card: ModelCard, plan: Plan, blocks: list[float]) -> list[float]:
    """`blocks` (per-token saved bytes of the trained blocks, lowest first) plus DoRA's share of each."""
    if not plan.use_dora or not blocks:
        return blocks
    sets = lora_block_sets(card, plan.targets)[-len(blocks):]
    return [v + block_saved_per_token(card, plan, sets[i], i == 0 and _first_in_blocks(plan))
            for i, v in enumerate(blocks)]


def outside_saved_per_token(card: ModelCard, plan: Plan) -> float:
    """Bytes per token that peft's wrapped Linears outside the blocks (BERT's MLM transform dense, OPT's
    project_in/out) save for backward: lora_A's input (peft's cast copy; with dropout its output and mask; the
    input itself when no cast copies it), A·x (saved by lora_B) and, with DoRA, `module_saved_bytes`. Their
    inputs need a gradient (they lie above the blocks or feed them), so nothing is `first`. 0 without LoRA."""
    from peftplan.planning.memory import activation_element_bytes, trainable_element_bytes

    if not plan.uses_lora or seq2seq.applies(card):  # T5's encoder Linears: seq2seq counts the encoder stack
        return 0.0
    e, lb = activation_element_bytes(plan, card), trainable_element_bytes(plan)
    ac = DTYPES[plan.autocast] if plan.autocast != "none" else 0
    total = 0.0
    stack = layout(card).block_prefix + "."  # Linears of layers that differ from the block (DeepSeek-V2's dense
    # first layer, its fused expert stacks) lie in the layer list: planning/moe.py counts them
    for lin, in_block, copies in lora_targets(card, plan.targets):
        if in_block or lin.name.startswith(stack):
            continue
        conv = e if (plan.method == "qlora" and ac) else lb
        saved = ac or conv
        x_saved = (saved + 1) * lin.d_in if plan.dropout else saved * lin.d_in
        per = x_saved + plan.r * (ac or lb)
        if plan.use_dora:
            per += module_saved_bytes(card, plan, lin, False) / plan.tokens
        total += copies * per
    return total


def _transients(card: ModelCard, plan: Plan, eye: bool = True, top: bool = False):
    """(bytes, Linear) of each wrapped block Linear's weight-norm working set (see `transient_bytes`)."""
    ac = DTYPES[plan.autocast] if plan.autocast != "none" else 0
    for lin, in_block, _ in lora_targets(card, plan.targets):
        if not in_block:
            continue
        a, x, _ = _dtypes(card, plan, lin, top)
        lw = ac or a  # lora_A(eye) and lora_B's output
        n, sq = lin.d_in * lin.d_out, lin.d_in * lin.d_in
        a_eye = _rounded(lw * plan.r * lin.d_in)
        making = (eye * (_rounded(a * sq) + (_rounded(ac * sq) if ac and ac != a else 0)) + a_eye
                  + _rounded(lw * n))
        adding = (eye * _rounded(lw * sq) + a_eye + _rounded(x * n)
                  + (2 + _weight_copied(card, plan, lin)) * _rounded(x * n))
        yield max(making, adding), lin


def _caller_x_bytes(card: ModelCard, plan: Plan, lin) -> int:
    """Element bytes of the input the wrapped Linear receives, before peft casts it to the adapter dtype: QLoRA
    under autocast as `_x_bytes` (no cast); mixed precision, or autocast over a LayerNorm: a norm's fp32 output
    for the Linears reading it,
    the autocast dtype for the attention output and the FFN's product; else the activations' dtype."""
    from peftplan.planning.memory import activation_element_bytes

    if plan.method == "qlora" and plan.autocast != "none":
        return _x_bytes(card, plan, lin)
    if plan.mixed_precision and lin.role in ("attn_in", "ffn_in"):
        return FP32
    if plan.autocast != "none" and card.norm == "layernorm" and lin.role in ("attn_in", "ffn_in"):
        return FP32  # autocast runs layer_norm in fp32: its output is fp32
    return activation_element_bytes(plan, card)


def _base_out_bytes(card: ModelCard, plan: Plan, lin) -> int:
    """Element bytes of the base layer's output (`result` in peft's lora.Linear.forward)."""
    ac = DTYPES[plan.autocast] if plan.autocast != "none" else 0
    if plan.method == "qlora":
        return _x_bytes(card, plan, lin) if ac else (FP32 if plan.kbit_prep else plan.bytes_per_element)
    return ac or plan.bytes_per_element


def _cast_copies(card: ModelCard, plan: Plan, lin) -> bool:
    """Does peft's cast of x to the adapter dtype make a copy (QLoRA under autocast: no cast at all)?"""
    if plan.method == "qlora" and plan.autocast != "none":
        return False
    return DTYPES[plan.adapter_dtype] != _caller_x_bytes(card, plan, lin)


def _reads_as_is(card: ModelCard, plan: Plan, lin) -> bool:
    """Does lora_A save the caller's x itself: no cast copy by peft (`_cast_copies`) and none by autocast
    (lora_A's Linear casts to the autocast dtype; QLoRA under autocast: peft does not cast first)?"""
    if plan.autocast == "none":
        return not _cast_copies(card, plan, lin)
    x = _caller_x_bytes(card, plan, lin)
    return not _cast_copies(card, plan, lin) and x == DTYPES[plan.autocast]


def in_flight_bytes(card: ModelCard, plan: Plan, lin, wrapped: frozenset[str]) -> int:
    """Tensors alive while the wrapped Linear `lin` computes its weight norm that no block's saved tensors count
    (they are referenced by the running Python frames, not by autograd): the base layer's output `result`
    (peft's lora.Linear.forward; without dropout it is base_result, which `module_saved_bytes` counts once the
    module returns); the input as the caller passed it and its cast to the adapter dtype, unless lora_A saves it
    (no dropout); for an output projection, the input of its attention / MLP (a local of the module's forward)
    unless the wrapped input projections save it. Under autocast lora_A saves autocast's copy of x, so x counts
    here unless it already is in the autocast dtype (QLoRA: peft's 4-bit Linear skips its cast, and the frozen
    Linear4bit keeps no input, bitsandbytes MatMul4Bit). Per module, bytes over the step's tokens."""
    t = plan.tokens
    a, cast, copy = DTYPES[plan.adapter_dtype], _caller_x_bytes(card, plan, lin), _cast_copies(card, plan, lin)
    total = _rounded(_base_out_bytes(card, plan, lin) * lin.d_out * t)
    if plan.dropout or not _reads_as_is(card, plan, lin):  # the caller's x is saved only when lora_A reads it as is
        total += _rounded(cast * lin.d_in * t)
    if plan.dropout and copy:  # the cast copy feeds dropout, which saves its output, not its input
        total += _rounded(a * lin.d_in * t)
    inputs = {"attn_out": "attn_in", "ffn_out": "ffn_in"}.get(lin.role)
    if inputs:
        feeders = [x for x in layout(card).block_linears if x.role == inputs]
        saved = (any(x.name in wrapped for x in feeders) and not plan.dropout
                 and _reads_as_is(card, plan, feeders[0]))  # lora_A of an input projection keeps it
        if feeders and not saved:
            total += _rounded(_caller_x_bytes(card, plan, feeders[0]) * feeders[0].d_in * t)
    return total


def transient_bytes(card: ModelCard, plan: Plan, eye: bool = True) -> int:
    """The largest wrapped block Linear's weight-norm working set, at the larger of two moments:
    computing lora_weight = B(A(eye)): the eye (adapter dtype; under autocast also its autocast-dtype copy),
    A·eye and B's d_in×d_out output; and the add inside the norm: the eye lora_A saved (under autocast its copy;
    the eye itself is freed on return), A·eye, lora_weight in x's dtype, the base weight in x's dtype (a copy
    unless it already is; a 4-bit weight is always dequantized), scaling·lora_weight and the sum.
    eye=False: a checkpointed forward, whose saved-tensor hooks keep nothing of lora_weight's graph."""
    if not plan.use_dora:
        return 0
    return max((b for b, _ in _transients(card, plan, eye)), default=0)


def _forward_cache_bytes(card: ModelCard, plan: Plan, act) -> int:
    """The autocast cache while the top block runs: LoRA's A and B copies (cached for the region), and under
    mixed precision the autocast copies of the frozen block Linears that autograd saved — every one whose input
    needs a gradient (checkpointed: none; the head's copy is made later)."""
    from peftplan.planning.memory import autocast_lora_bytes

    total = autocast_lora_bytes(card, plan)
    if plan.mixed_precision and plan.method != "qlora" and not plan.grad_checkpointing:
        per_block = sum(x.weight_numel + (x.d_out if x.bias else 0) for x in layout(card).block_linears)
        trained = len(lora_block_sets(card, plan.targets)) - next(
            (i for i, names in enumerate(lora_block_sets(card, plan.targets)) if names), 0)
        sets = lora_block_sets(card, plan.targets)
        low = sets[len(sets) - trained] if trained else frozenset()
        # the lowest block's Linears up to its first wrapped group read inputs without gradient: not saved
        no_grad = sum(x.weight_numel + (x.d_out if x.bias else 0) for x in layout(card).block_linears
                      if not _input_has_grad(x, low, card))
        total += DTYPES[plan.autocast] * (per_block * trained - no_grad * _first_in_blocks(plan))
    return total


def output_gradient_bytes(card: ModelCard, plan: Plan, wrapped: frozenset[str]) -> int:
    """Gradients alive while a checkpointed block is recomputed. Reentrant (torch.utils.checkpoint's
    CheckpointFunction.backward): the recomputation runs first, beside the gradient of the block's output alone.
    Non-reentrant: it starts at the first backward node that unpacks a saved tensor (a dropout on the FFN's
    output unpacks its mask at once). Before it: the gradient of the block's output (stream dtype); QLoRA with
    the FFN's output projection unwrapped, that projection's input gradient; when DoRA wraps the FFN's output
    projection (its output is the block's last op), the nodes that save nothing: the residual sum's gradient
    cast to the FFN output's dtype (a new tensor only when that differs from the stream's), `result.to(dtype)`'s
    backward and the base branch's cast back when peft's sum `result` (base output + DoRA's, promoted) is wider
    than the base output, and `· scaling`'s product in the magnitude's dtype."""
    from peftplan.planning.memory import stream_element_bytes

    t, s = plan.tokens, stream_element_bytes(plan, card)
    stream = _rounded(s * card.d_model * t)
    last = [x for x in layout(card).block_linears if x.role == "ffn_out" and x.name in wrapped]
    if plan.use_reentrant or card.hidden_dropout > 0:  # the FFN output's dropout unpacks its mask first
        return stream
    if not last:
        # a frozen 4-bit output projection unpacks nothing (bitsandbytes MatMul4Bit keeps its weight in
        # ctx.tensors): its input's gradient (its input's dtype, d_ff wide) is made before the recomputation
        down = [x for x in layout(card).block_linears if x.role == "ffn_out"]
        if plan.method == "qlora" and down:
            return stream + _rounded(_base_out_bytes(card, plan, down[0]) * down[0].d_in * t)
        return stream
    a, lin = DTYPES[plan.adapter_dtype], last[0]
    base = _base_out_bytes(card, plan, lin)
    wide = max(base, a)  # the dtype of result + result_dora
    return (stream + (_rounded(base * lin.d_out * t) if base != s else 0) + _rounded(a * lin.d_out * t)
            + (_rounded(wide * lin.d_out * t) + _rounded(base * lin.d_out * t) if wide != base else 0))


def _later_saved(card: ModelCard, plan: Plan, lin, first_block: bool) -> float:
    """Bytes DoRA will save in the top block's wrapped Linears that run after `lin` (a later group: the FFN's
    after the attention's, the FFN's output projection after its input ones; in a group, v after q): not yet
    made while `lin` runs."""
    wrapped = lora_block_sets(card, plan.targets)[-1]
    # a group's Linears run in the layout's order (q, k, v)
    order = {x.name: (ROLES.index(x.role) if x.role in ROLES else 0, i)
             for i, x in enumerate(layout(card).block_linears)}
    return sum(module_saved_bytes(card, plan, x, first_block and not _input_has_grad(x, wrapped, card))
               for x in layout(card).block_linears
               if x.name in wrapped and order.get(x.name, (0, 0)) > order.get(lin.name, (0, 0)))


def _runs_after(card: ModelCard, lin, other) -> bool:
    """Does the block Linear `other` run after `lin` in forward (groups in ROLES order, a group in the layout's
    order: q, k, v)? A parallel block runs its attention, then its MLP (transformers models/gptj GPTJBlock,
    models/falcon FalconDecoderLayer)."""
    order = {x.name: (ROLES.index(x.role) if x.role in ROLES else 0, i)
             for i, x in enumerate(layout(card).block_linears)}
    return order.get(other.name, (0, 0)) > order.get(lin.name, (0, 0))


def lora_branch_per_token(card: ModelCard, plan: Plan, lin, made: bool = False) -> float:
    """Bytes per token the LoRA branch lora_B(lora_A(x)) of the wrapped Linear `lin` saves beyond its input x
    as memory.py counts it (lora_A's cast copy of x, with dropout the dropout's output beside its mask, and A·x,
    saved by lora_B), less what is already alive while DoRA computes the weight norm: peft's DoRA runs the
    branch after the norm (`DoraLinearLayer.forward`), but the dropout ran before it (`DoraLinearVariant.forward`).
    made=True: the whole count (the branch of a Linear that ran before)."""
    from peftplan.planning.memory import trainable_element_bytes

    ac = DTYPES[plan.autocast] if plan.autocast != "none" else 0
    lb, x = trainable_element_bytes(plan), _caller_x_bytes(card, plan, lin)
    conv = x if (plan.method == "qlora" and ac) else lb
    saved = ac or conv
    if made:
        copy = (saved + 1 if plan.dropout else 0 if (conv == x and saved == x) else saved)
    elif plan.dropout:  # the dropout's output (conv) and mask exist already; lora_A's autocast copy does not
        copy = saved - conv
    elif conv == x and saved == x:  # lora_A saves x itself
        copy = 0
    else:  # peft's cast copy (conv) exists already; lora_A's autocast copy does not
        copy = saved - (conv if conv != x else 0)
    return copy * lin.d_in + plan.r * (ac or lb)


def _later_plain(card: ModelCard, plan: Plan, lin, wrapped: frozenset[str], first: bool) -> float:
    """Bytes the top block saves outside DoRA's own tensors (memory.block_saved_per_token) that do not exist
    yet while `lin` computes its weight norm in forward: the LoRA branches of `lin` and of the wrapped Linears
    after it, and for an attention input projection what the block saves from its attention kernel on, for the
    attention output projection the MLP's (an FFN input projection: memory's part="mlp" holds both)."""
    from peftplan.planning.memory import block_saved_per_token as plain

    t, linears = plan.tokens, layout(card).block_linears
    branches = sum(lora_branch_per_token(card, plan, x) for x in linears
                   if x.name in wrapped and (x is lin or _runs_after(card, lin, x)))
    if lin.role == "ffn_in":  # the FFN input projections' branches are in memory's MLP part
        # a gated MLP's gate projection runs before the up projection: its output, its activation and its LoRA
        # branch exist (transformers models/llama LlamaMLP.forward: down(act(gate(x)) * up(x)))
        made = sum(2 * card.gated_mlp * _out_bytes(card, plan, x, wrapped) * x.d_out
                   + (lora_branch_per_token(card, plan, x, made=True) if x.name in wrapped else 0)
                   for x in linears if x.role == "ffn_in" and _runs_after(card, x, lin))
        made += lora_branch_per_token(card, plan, lin, made=True) - lora_branch_per_token(card, plan, lin)
        return (plain(card, plan, False, first, wrapped, part="mlp") - made) * t
    if lin.role == "attn_in":
        later = plain(card, plan, False, first, wrapped) - plain(card, plan, False, first, wrapped,
                                                                 part="before_attention")
        return (later + branches) * t
    if lin.role == "attn_out":
        return (plain(card, plan, False, first, wrapped, part="mlp") + branches) * t
    return branches * t


def _out_bytes(card: ModelCard, plan: Plan, lin, wrapped: frozenset[str]) -> int:
    """Element bytes of a block Linear's output as the block receives it: the base output's dtype (peft's
    lora.Linear casts its sum back); a 4-bit DoRA module under autocast returns fp32 (the fp32 magnitude scale
    promotes the sum, and peft's 4-bit twin casts nothing back under autocast)."""
    if lin.name in wrapped and plan.use_dora and plan.method == "qlora" and plan.autocast != "none":
        return FP32
    return _base_out_bytes(card, plan, lin)


def _block_locals(card: ModelCard, plan: Plan, lin, wrapped: frozenset[str], first: bool) -> int:
    """Tensors of the running block that its forward's locals keep and no saved tensor counts while `lin`
    computes its weight norm: the residual (the block's input, or after the attention), in the lowest block of a
    frozen base (`first`, whose input no norm saves) or where the norms save an fp32 copy of it; for a separate
    q/k/v projection the outputs of those that ran before it (the attention reads them later); in a parallel block (GPT-J, GPT-NeoX, Falcon: x + attn(ln(x)) + mlp(ln(x)))
    while its MLP runs, the attention output waiting for the final sum (a sequential block adds it to the
    residual at once, and the next norm saves the sum). Bytes over the step's tokens (transformers
    models/gptj GPTJBlock.forward, GPTJAttention.forward)."""
    from peftplan.planning.memory import stream_element_bytes

    t, linears, e = plan.tokens, layout(card).block_linears, stream_element_bytes(plan, card)
    # a norm saves an fp32 copy of a narrower stream (RMSNorm always, LayerNorm under autocast), not the residual
    copied = e != FP32 and (card.norm == "rmsnorm" or plan.autocast != "none")
    total = (first or copied) * _rounded(e * card.d_model * t)
    if lin.role == "attn_in":
        total += sum(_rounded(_out_bytes(card, plan, x, wrapped) * x.d_out * t) for x in linears
                     if x.role == "attn_in" and _runs_after(card, x, lin))
    o = next((x for x in linears if x.role == "attn_out"), None)
    if card.parallel_block and lin.role in ("ffn_in", "ffn_out") and o is not None:
        total += _rounded(_out_bytes(card, plan, o, wrapped) * card.d_model * t)
    return total


def _later_copies(card: ModelCard, plan: Plan, lin, wrapped: frozenset[str], first: bool) -> int:
    """Mixed precision: the autocast copies of the top block's frozen Linears that run after `lin`, which
    `_forward_cache_bytes` counts and which do not exist yet while `lin` computes its weight norm."""
    if not plan.mixed_precision or plan.method == "qlora" or plan.grad_checkpointing:
        return 0
    return DTYPES[plan.autocast] * sum(x.weight_numel + (x.d_out if x.bias else 0) for x in layout(card).block_linears
                                       if _runs_after(card, lin, x)
                                       and not (first and not _input_has_grad(x, wrapped, card)))
def _input_copy_per_token(card: ModelCard, plan: Plan, lin) -> int:
    """Bytes per token a wrapped input projection's lora_A keeps of its input beyond the input itself, in a
    recomputed block (every input needs a gradient): with LoRA dropout the dropout output (cast as lora_A reads
    it) and its 1-byte mask; else a copy only when a cast makes one, 0 when lora_A keeps the input itself
    (memory._block_saved_per_token's `group_saved`)."""
    from peftplan.planning.memory import trainable_element_bytes

    ac = DTYPES[plan.autocast] if plan.autocast != "none" else 0
    x = _norm_out_bytes(card, plan)
    conv = x if (plan.method == "qlora" and ac) else trainable_element_bytes(plan)
    saved = ac or conv
    if plan.dropout:
        return (saved + 1) * lin.d_in
    return 0 if conv == x and saved == x else saved * lin.d_in


def _branch_per_token(card: ModelCard, plan: Plan, lin) -> int:
    """Bytes per token a wrapped input projection's LoRA branch saves: lora_A's input copy and A·x (lora_B)."""
    from peftplan.planning.memory import trainable_element_bytes

    ac = DTYPES[plan.autocast] if plan.autocast != "none" else 0
    return _input_copy_per_token(card, plan, lin) + plan.r * (ac or trainable_element_bytes(plan))


def _copy_bytes(card: ModelCard, plan: Plan, names: set[str]) -> int:
    """Mixed precision: the autocast weight copies the Linears `names` save in a recomputed block (every input
    needs a gradient; memory.block_cache_bytes)."""
    if not plan.mixed_precision or plan.method == "qlora":
        return 0
    return DTYPES[plan.autocast] * sum(x.weight_numel + (x.d_out if x.bias else 0)
                                       for x in layout(card).block_linears if x.name in names)


def recomputed_after_bytes(card: ModelCard, plan: Plan, lin, wrapped: frozenset[str]) -> tuple[int, int]:
    """(saved activations, autocast weight copies) of a recomputed block that are not yet made while its
    wrapped Linear `lin` computes the weight norm, over the step's tokens, beyond DoRA's own (`_later_saved`).

    The recomputation replays the block's forward in order (peft's lora.Linear.forward: the base layer, its
    weight copy saved, then the dropout and its mask, then DoRA's norm before lora_A runs): for an input
    projection of the FFN, what the MLP and the output projection save (memory's part "mlp") except the LoRA
    branches of the FFN input projections that ran before it; for the attention output projection, the whole
    FFN side (its input as kept, the post-attention norm, the MLP); for an attention input projection,
    everything but the block's first norm, the kept normed input and the earlier input projections' branches.
    The sublayer-output dropout masks and the weight copies of the Linears after `lin` follow the same order."""
    from peftplan.planning.memory import (_groups, _needs_grad, _norm_inputs_grad, _post_norm,
                                          activation_element_bytes, block_saved_per_token, norm_saved)

    if lin.role not in ROLES:
        return 0, 0
    t = plan.tokens
    lins = layout(card).block_linears
    order = {x.name: (ROLES.index(x.role) if x.role in ROLES else 0, i) for i, x in enumerate(lins)}
    pos = order[lin.name]
    later = {x.name for x in lins if order[x.name] > pos}
    earlier = [x for x in lins if order[x.name] < pos and x.role == lin.role and x.name in wrapped]
    mask = lin.d_in if plan.dropout else 0  # lin's LoRA-dropout mask is made before the norm
    masks = card.d_model * (card.hidden_dropout > 0)  # one bool mask per sublayer output
    copies = _copy_bytes(card, plan, later)
    if lin.role == "ffn_out":
        return int(masks * t), copies
    mlp = block_saved_per_token(card, plan, False, False, wrapped, part="mlp")
    if lin.role == "ffn_in":
        # a gated MLP runs act(gate_proj(x)) before up_proj(x): the gate's output and its activation are made
        gate_ran = card.gated_mlp and any("gate" in x.name.rsplit(".", 1)[-1] for x in lins
                                          if x.role == "ffn_in" and order[x.name] < pos)
        made = 2 * activation_element_bytes(plan, card) * card.d_ff * gate_ran
        after = mlp - sum(_branch_per_token(card, plan, x) for x in earlier) - mask + masks - made
        return int(max(after, 0) * t), copies
    block = block_saved_per_token(card, plan, False, False, wrapped)
    attn_in, _, ffn_in, _ = _groups(card)
    if lin.role == "attn_out":
        norms = _norm_inputs_grad(card, _needs_grad(card, plan, False, False, wrapped))
        post = 0 if _post_norm(card) or card.parallel_block else sum(norms[1:]) * norm_saved(card, plan, False)
        kept_x = _shares_input(card, plan, ffn_in, wrapped) and not card.parallel_block
        after = mlp + post + kept_x * _norm_out_bytes(card, plan) * card.d_model + 2 * masks
        return int(min(after, block) * t), copies
    first_norm = 0 if _post_norm(card) else norm_saved(card, plan, False)
    kept_x = _shares_input(card, plan, attn_in, wrapped)
    before = (first_norm + kept_x * _norm_out_bytes(card, plan) * card.d_model
              + sum(_branch_per_token(card, plan, x) for x in earlier) + mask)
    return int(max(block - before, 0) * t), copies


def _norm_out_bytes(card: ModelCard, plan: Plan) -> int:
    """Element bytes of a norm's output (autocast runs layer_norm in fp32; else the stream's dtype)."""
    from peftplan.planning.memory import stream_element_bytes

    return FP32 if plan.autocast != "none" and card.norm == "layernorm" else stream_element_bytes(plan, card)


def _shares_input(card: ModelCard, plan: Plan, names: list[str], wrapped: frozenset[str]) -> bool:
    """Does a wrapped Linear of the group keep the group's input itself (no dropout, no cast copy)?"""
    return any(x.name in names and x.name in wrapped and not plan.dropout
               and _input_copy_per_token(card, plan, x) == 0 for x in layout(card).block_linears)


def _promote_pair(x: tuple[int, str], y: tuple[int, str]) -> tuple[int, str]:
    """torch's type promotion of two floating (bytes, name) dtypes: the wider; fp16 with bf16 gives fp32."""
    if x[1] == y[1]:
        return x
    return max(x, y) if x[0] != y[0] else (FP32, "fp32")


def result_working_set(card: ModelCard, plan: Plan, lin) -> int:
    """Bytes alive in peft's DoraLinearLayer.forward while it combines the outputs, after the weight norm:
    `(m_scale − 1)·base_result + m_scale·lora_result·scaling`. The locals lora_weight (in x's dtype) and its
    autograd graph (lora_A saved the eye, or its autocast copy; lora_B saved A·eye), the base weight in x's dtype
    when that is a copy, and three d_out-wide products per token: (m_scale − 1)·base_result, m_scale·lora_result
    and its product by scaling (then the sum in their promoted dtype, with the second freed), each in the dtype
    torch promotes the magnitude's and the operand's to. The module's saved tensors (base_result, lora_B's
    output: `module_saved_bytes`) all exist by then. A recomputed block keeps the graph: the recomputation's
    saved-tensor hook returns the tensor itself (torch.utils.checkpoint `_recomputation_hook`)."""
    a, x, base = _dtypes(card, plan, lin)
    ac = DTYPES[plan.autocast] if plan.autocast != "none" else 0
    lw = ac or a
    n, sq, t = lin.d_in * lin.d_out, lin.d_in * lin.d_in, plan.tokens
    graph = _rounded(lw * sq) + _rounded(lw * plan.r * lin.d_in) + _rounded(x * n)
    weight = _rounded(x * n) if _weight_copied(card, plan, lin) else 0
    mag = (a, plan.adapter_dtype)
    base_name = "fp32" if base == FP32 else (plan.autocast if ac and base == ac else plan.dtype)
    t1 = _promote_pair(mag, (base, base_name))
    t2 = _promote_pair(mag, (lw, plan.autocast if ac else plan.adapter_dtype))
    total = _promote_pair(t1, t2)
    wide = [_rounded(b * lin.d_out * t) for b in (t1[0], t2[0], total[0])]
    return graph + weight + max(wide[0] + 2 * wide[1], wide[0] + wide[1] + wide[2])


def in_flight_overcount_bytes(card: ModelCard, plan: Plan, lin, wrapped: frozenset[str]) -> int:
    """What `in_flight_bytes` counts for an FFN output projection that is not in flight beside the block's saved
    tensors: its input when that is a ReLU's output (ReLU saves its output, counted among the block's saved
    tensors; OPT), and the MLP's input where the block calls the FFN's Linears itself, rebinding one local
    (transformers models/opt OPTDecoderLayer.forward: `hidden_states = self.fc1(hidden_states)`), so the norm's
    output dies once the input projection returns. Each under the very condition `in_flight_bytes` counts it
    (`_reads_as_is`: under autocast lora_A saves autocast's copy, not x). Bytes over the step's tokens."""
    from peftplan.planning.memory import _post_norm

    if lin.role != "ffn_out":
        return 0
    t, over = plan.tokens, 0
    if card.activation == "relu" and not card.gated_mlp and (plan.dropout or not _reads_as_is(card, plan, lin)):
        over += _rounded(_caller_x_bytes(card, plan, lin) * lin.d_in * t)
    feeders = [x for x in layout(card).block_linears if x.role == "ffn_in"]
    saved = (any(x.name in wrapped for x in feeders) and not plan.dropout
             and _reads_as_is(card, plan, feeders[0]))  # as in `in_flight_bytes`, which this cancels
    inline = feeders and "." not in feeders[0].name and not _post_norm(card)  # no MLP module; post-norm: the
    if inline and not saved:  # FFN's input is the residual too
        over += _rounded(_caller_x_bytes(card, plan, feeders[0]) * feeders[0].d_in * t)
    return over


def dropout_output_bytes(card: ModelCard, plan: Plan, lin) -> tuple[int, int]:
    """(at the weight norm, at the outputs' combination): what the module's LoRA-dropout output adds beyond the
    block's count of its LoRA branch, which holds lora_A's saved input. peft's DoraLinearVariant.forward runs
    `x = dropout(x)` before the norm and keeps x until DoRA returns; under autocast lora_A's F.linear saves a cast
    copy, not x. So at the norm x lives where the cast (not yet made) was counted, and while the outputs are
    combined both live. 0 when lora_A saves x itself. Bytes over the step's tokens."""
    from peftplan.planning.memory import trainable_element_bytes

    if not plan.dropout or plan.autocast == "none":
        return 0, 0
    ac = DTYPES[plan.autocast]
    conv = _x_bytes(card, plan, lin) if plan.method == "qlora" else trainable_element_bytes(plan)
    if conv == ac:
        return 0, 0
    n = lin.d_in * plan.tokens
    return _rounded(conv * n) - _rounded(ac * n), _rounded(conv * n)


def recompute_lora_cache_bytes(card: ModelCard, plan: Plan, lin, wrapped: frozenset[str]) -> int:
    """Under autocast the recomputation re-enters autocast (torch.utils.checkpoint restores the forward's
    autocast state), whose cache keeps the autocast-dtype copies of the trainable LoRA factors cast so far: A
    and B of each wrapped Linear of the block up to `lin` (its own cast for lora_weight = B(A(eye))); the cache
    is cleared when that autocast region exits. 0 when the adapter already is in the autocast dtype."""
    if plan.autocast == "none" or plan.adapter_dtype == plan.autocast:
        return 0
    ac, r = DTYPES[plan.autocast], plan.r
    lins = layout(card).block_linears
    order = {x.name: (ROLES.index(x.role) if x.role in ROLES else 0, i) for i, x in enumerate(lins)}
    return sum(_rounded(ac * r * x.d_in) + _rounded(ac * x.d_out * r) for x in lins
               if x.name in wrapped and order[x.name] <= order[lin.name])


def residual_in_flight_bytes(card: ModelCard, plan: Plan, lin) -> int:
    """While an FFN Linear runs, the tensor the block adds the FFN's output to, held by the block's forward
    frame and saved by nothing: in a sequential pre-norm block the residual sum after attention, unless the
    post-attention norm saves that very tensor (LayerNorm without autocast, or an fp32 stream); in a parallel
    block the attention output (transformers models/falcon, gpt_neox, gptj: `mlp_output + attention_output`).
    Post-norm blocks feed the norm's output on, which the FFN's Linears read (`in_flight_bytes`)."""
    from peftplan.planning.memory import _post_norm, stream_element_bytes

    if lin.role not in ("ffn_in", "ffn_out") or _post_norm(card):
        return 0
    t, d = plan.tokens, card.d_model
    if card.parallel_block:
        out = next((x for x in layout(card).block_linears if x.role == "attn_out"), None)
        return _rounded(_base_out_bytes(card, plan, out) * d * t) if out else 0
    s = stream_element_bytes(plan, card)
    if s == FP32 or (card.norm == "layernorm" and plan.autocast == "none"):
        return 0
    return _rounded(s * d * t)


def moments(card: ModelCard, plan: Plan, st, act, grads_late: int, fwd, bwd):
    """(forward, backward) with the weight-norm working set's moments added where they are larger.

    Forward: the top block's largest wrapped Linear runs over what the blocks saved before it (all but its own
    DoRA tensors; checkpointed: every block's kept input), beside the forward's autocast cache. Checkpointed
    backward: the same module recomputed, once in the top block before any gradient (every kept input and the
    top block's recomputed tensors) and once in the lowest trained block (the other blocks' gradients written,
    that block's recomputed tensors beside it), each beside the gradient of the block's output and the block's own
    autocast copies (the head's copy died with the head's backward). Every moment also holds the module's
    in-flight tensors (`in_flight_bytes`). Recomputed, the block holds only what it made before the module
    (`recomputed_after_bytes`), the frame's residual (`residual_in_flight_bytes`), and each module has a second
    moment after its norm, combining its outputs (`result_working_set`).
    `st`, `act`: memory.Static and memory.Activations; `grads_late`: gradients present when the lowest trained
    block runs backward (all of them under gradient accumulation)."""
    from peftplan.planning.memory import _memory, block_cache_bytes, shared_input_bytes

    if not plan.use_dora:
        return fwd, bwd
    ckpt = plan.grad_checkpointing
    accum = st.gradients_bytes if plan.grad_accum > 1 else 0
    inputs = act.saved_bytes - act.outside_bytes
    only_block = act.saved_bytes and act.first_block_bytes == act.saved_bytes - act.outside_bytes
    first_top = bool(only_block) and _first_in_blocks(plan)
    top_wrapped = lora_block_sets(card, plan.targets)[-1]
    cache = _forward_cache_bytes(card, plan, act)
    cands = []
    for tr, lin in _transients(card, plan, eye=not ckpt, top=True):
        first = first_top and not _input_has_grad(lin, top_wrapped, card)
        own = 0 if ckpt else int(module_saved_bytes(card, plan, lin, first)
                                 + _later_saved(card, plan, lin, first_top))
        own += 0 if ckpt else int(_later_plain(card, plan, lin, top_wrapped, first_top))
        tr += (in_flight_bytes(card, plan, lin, top_wrapped)
               + _block_locals(card, plan, lin, top_wrapped, first_top and not ckpt))
        cands.append(_memory("forward", st, activations_bytes=inputs - own,
                             temporaries_bytes=tr + cache - _later_copies(card, plan, lin, top_wrapped, first_top),
                             gradients_bytes=accum))
    fwd = max([fwd, *cands], key=lambda m: m.tensor_bytes)
    if ckpt:
        # the head's autocast copy died with its backward; the recomputed block saves its own copies again
        top_cache, low_cache = (block_cache_bytes(card, plan, lowest=x) for x in (False, True))
        cands, t = [], plan.tokens
        stream = output_gradient_bytes(card, plan, top_wrapped)
        shared = shared_input_bytes(card, plan)  # the top block's kept input, saved again by its first norm
        for norm_set, lin in _transients(card, plan):
            after, copies = recomputed_after_bytes(card, plan, lin, top_wrapped)
            later = int(_later_saved(card, plan, lin, False)) + after
            flight = (in_flight_bytes(card, plan, lin, top_wrapped)
                      - in_flight_overcount_bytes(card, plan, lin, top_wrapped))
            beside = (flight + stream + residual_in_flight_bytes(card, plan, lin)
                      + recompute_lora_cache_bytes(card, plan, lin, top_wrapped))
            # two moments of the module: its weight norm (its own saved tensors not yet made), and the outputs'
            # combination (made; without dropout or bias base_result is `result` itself, counted in flight)
            own = int(module_saved_bytes(card, plan, lin, False))
            same = 0 if plan.dropout or lin.bias else _rounded(_base_out_bytes(card, plan, lin) * lin.d_out * t)
            at_norm, at_result = dropout_output_bytes(card, plan, lin)
            for work, mine in ((norm_set + at_norm, later + own),
                               (result_working_set(card, plan, lin) - same + at_result, later)):
                cands += [_memory("backward", st, activations_bytes=inputs + act.top_block_bytes - mine - shared,
                                  temporaries_bytes=work + beside + top_cache - copies, gradients_bytes=accum),
                          _memory("backward", st,
                                  activations_bytes=act.checkpoint_bytes + act.first_block_bytes - mine,
                                  temporaries_bytes=work + beside + low_cache - copies,
                                  gradients_bytes=max(accum, grads_late))]
        bwd = max([bwd, *cands], key=lambda m: m.tensor_bytes)
    return fwd, bwd
