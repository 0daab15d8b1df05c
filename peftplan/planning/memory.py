"""Peak memory of one steady-state training step, component by component, in bytes.

Symbols (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"):
    b batch, s sequence, t = b·s tokens, d hidden, f FFN inner size, h heads, d_h head dim,
    q = h·d_h query width, k = h_kv·d_h key/value width, V vocabulary, L blocks, e bytes per element.

Weights, gradients and optimizer states are counted exactly from the parameter accounting. Activations are
the tensors autograd saves for backward, op by op, following PyTorch's rules: a Linear saves its input only
when its weight trains; an elementwise product saves each factor only when the other needs a gradient.
`peftplan check` holds these formulas to the fake-tensor trace of the real step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from peftplan.planning import families, moe
from peftplan.planning.cards import ModelCard
from peftplan.planning import dora
from peftplan.planning import autocast_copies, dequant, seq2seq
from peftplan.planning.layout import layout
from peftplan.planning.loss import shift_copy_bytes, shifted_rows_bytes
from peftplan.planning.scaler import with_scaler
from peftplan.planning.params import (ParamCounts, count, lora_block_sets, lora_targets, qlora_weight_bytes,
                                      quantizable)
from peftplan.plan import DTYPES, Plan
from peftplan.results import Memory

FP32 = 4
CUDA_ALLOC_ROUND = 512  # the caching allocator rounds every block up to 512 B
# Outside torch's allocator; measured values replace these when profiles/measured/ has them (see calibration).
CUDA_CONTEXT_BYTES = 500 * 2**20  # CUDA context + kernels image (H100, torch 2.x: ~0.5 GiB seen by NVML)
CUBLAS_WORKSPACE_BYTES = 8 * 2**20  # one cuBLAS workspace per stream (CUBLAS_WORKSPACE_CONFIG default :4096:8)
# Reserved / live bytes at the step's peak, by the phase holding the peak: the median over caching-allocator
# replays of the check grid's traces (benchmarks/fit_reserved.py; rules in peftplan/planning/allocator.py).
# Assumes fixed shapes (packed or padded to one length) and default PYTORCH_CUDA_ALLOC_CONF; lengths that vary
# from step to step grow reserved further (`peftplan trace --seq-lens`). No grid point peaks in forward: it
# takes backward's value (both are activation-dominated).
RESERVED_PER_LIVE = {"forward": 1.090, "backward": 1.090, "optimizer": 1.112}


def activation_element_bytes(plan: Plan, card: ModelCard | None = None) -> int:
    """Element size of the activations. QLoRA's k-bit preparation stores embeddings and norms in fp32, so
    the residual stream and every Linear4bit output (returned in its input's dtype) are fp32."""
    if plan.mixed_precision and plan.method != "qlora":
        # fp32 weights under autocast: Linear, attention and MLP tensors in the autocast dtype (a Linear4bit
        # casts its output back to its input's dtype: bitsandbytes nn.Linear4bit.forward)
        return DTYPES[plan.autocast]
    if plan.method == "qlora" and card is not None and card.norm == "layernorm" and plan.autocast != "none":
        return FP32  # autocast runs layer_norm in fp32: the Linear4bits read, and return, fp32
    return FP32 if plan.method == "qlora" and plan.kbit_prep else plan.bytes_per_element


def stream_element_bytes(plan: Plan, card: ModelCard | None = None) -> int:
    """Element size of the residual stream and the norms: fp32 under mixed precision (the embedding output is
    fp32, a fp32 + bf16 residual add promotes, norms run in fp32: CUDA autocast's fp32 list), else as above.
    Post-norm LayerNorm blocks (BERT, RoBERTa) under any autocast: fp32 too, as the stream is a LayerNorm output
    (autocast runs layer_norm in fp32) and each residual add promotes the sublayer's output to it."""
    if plan.mixed_precision or (card is not None and plan.autocast != "none" and card.encoder
                                and card.norm == "layernorm"):
        return FP32
    return activation_element_bytes(plan, card)


def autocast_cache_bytes(card: ModelCard, plan: Plan, blocks: bool = True) -> int:
    """Autocast-dtype copies of weights that are not in that dtype, live from their forward use to their backward.

    torch.autocast (CUDA lower-precision list: linear, matmul, addmm, ...) casts each weight to the autocast
    dtype; copies of trainable leaf weights are cached for the region, and autograd saves every copy whose
    Linear input needs a gradient, frozen weights' included. Counted: under mixed precision every Linear of the
    blocks that saves its copy, and the Linears outside them; an fp32 head (mixed precision, k-bit preparation);
    LoRA's A and B when they are not in the autocast dtype. Embeddings and norms are not autocast ops; 4-bit
    weights are dequantized by bitsandbytes, not cast. blocks=False: only the head's copy (after a checkpointed
    forward, whose blocks saved no copies and whose cache was freed when the autocast region ended).
    """
    if plan.autocast == "none":
        return 0
    lay, e = layout(card), DTYPES[plan.autocast]
    total = 0
    if blocks and plan.mixed_precision and plan.method != "qlora":
        numel = {x.name: x.weight_numel + (x.d_out if x.bias else 0) for x in lay.block_linears}
        block = sum(numel.values())
        if plan.uses_lora:
            # below the lowest wrapped block no input needs a gradient; in it, only some Linears' inputs do
            low, wrapped = lowest_lora_block(card, plan)
            g = _needs_grad(card, plan, False, True, wrapped)
            total += block * (card.n_layers - low - 1) + sum(numel[n] for n in _grad_input_linears(card, g))
        else:
            total += block * (plan.top_k if plan.method == "top" else card.n_layers)
    if plan.mixed_precision and plan.method != "qlora":  # outside the blocks (MLM dense, OPT's project_out)
        total += sum(x.weight_numel for x in lay.other_linears)
        total -= seq2seq.unsaved_encoder_copies(card, plan, blocks)  # T5's encoder Linears (planning/seq2seq.py)
    total += seq2seq.kept_fp32_copies(card, plan, blocks)  # QLoRA's unquantized fp32 wo on T5 (planning/seq2seq.py)
    head_bytes = FP32 if plan.mixed_precision or (plan.method == "qlora" and plan.kbit_prep) else plan.bytes_per_element
    if head_bytes != e:
        total += lay.head_rows * lay.head_cols
    if blocks and plan.uses_lora and DTYPES[plan.adapter_dtype] != e:
        total += sum(trainable_tensors(card, plan))
    return e * total


def autocast_lora_bytes(card: ModelCard, plan: Plan) -> int:
    """LoRA's A and B copies in the autocast dtype (cached for the region: they are trainable leaves)."""
    if plan.autocast == "none" or not plan.uses_lora or DTYPES[plan.adapter_dtype] == DTYPES[plan.autocast]:
        return 0
    return DTYPES[plan.autocast] * sum(trainable_tensors(card, plan))


def trainable_element_bytes(plan: Plan) -> int:
    """Element size of trainable parameters. LoRA's A and B are `plan.adapter_dtype`: fp32 by default, as
    peft 0.21's `get_peft_model(autocast_adapter_dtype=True)` upcasts bf16/fp16 adapters
    (peft/tuners/tuners_utils.py `_cast_adapter_dtype`); everything else trains in the weights' dtype."""
    return DTYPES[plan.adapter_dtype] if plan.uses_lora else plan.bytes_per_element


def rounded(nbytes: int) -> int:
    """Bytes the CUDA caching allocator hands out for a request of nbytes."""
    return max(CUDA_ALLOC_ROUND, -(-nbytes // CUDA_ALLOC_ROUND) * CUDA_ALLOC_ROUND)


# ---------------------------------------------------------------- weights, gradients, optimizer


@dataclass(frozen=True)
class Static:
    frozen_weights_bytes: int
    trainable_weights_bytes: int
    gradients_bytes: int
    optimizer_states_bytes: int
    optimizer_temporaries_bytes: int  # live only inside optimizer.step()
    largest_gradient_bytes: int  # the largest of one block's gradients (written during that block's backward)


def trainable_tensors(card: ModelCard, plan: Plan) -> list[int]:
    """numel of each trainable tensor (the optimizer keeps state per tensor)."""
    lay = layout(card)
    L = card.n_layers
    if plan.method in ("full", "top"):
        # in the model's parameter order (a Linear's weight then its bias; embeddings first, the head last):
        # the order the optimizer walks them
        per_block = [n for x in lay.block_linears for n in (x.weight_numel, x.d_out)[:1 + bool(x.bias)]]
        per_block += [k for n in lay.block_norms for k in (n.size, n.size)[:1 + bool(n.bias)]]
        per_block += [p.numel for p in lay.block_params]  # fused experts, routers, sinks (generated cards)
        if plan.method == "top":
            return per_block * plan.top_k
        rest = [n for x in lay.other_linears for n in (x.weight_numel, x.d_out)[:1 + bool(x.bias)]]
        rest += [k for n in lay.other_norms for k in (n.size, n.size)[:1 + bool(n.bias)]]
        rest += [p.numel for p in lay.other_params]
        if not lay.head_tied:
            rest.append(lay.head_rows * lay.head_cols)
        if lay.head_bias:
            rest.append(lay.head_bias)
        return [e.numel for e in lay.embeddings] + per_block * L + rest
    if plan.method == "adapter":
        m, d = plan.adapter_size, card.d_model
        per = [m * d, m, d * m, d] * (2 if plan.adapter_placement == "houlsby" else 1)
        norms = [n.size for n in lay.block_norms] + [n.size for n in lay.block_norms if n.bias]
        other = [n.size for n in lay.other_norms] + [n.size for n in lay.other_norms if n.bias]
        return (per + norms) * L + other
    out = []
    for lin, _, copies in lora_targets(card, plan.targets):
        out += [plan.r * lin.d_in, lin.d_out * plan.r] * copies
    return out + dora.magnitudes(card, plan)


def optimizer_state_bytes(numels: list[int], plan: Plan) -> int:
    e = trainable_element_bytes(plan)
    opt = plan.optimizer
    if opt == "adamw":
        # exp_avg and exp_avg_sq like the parameter, plus a fp32 scalar `step` tensor per parameter
        return sum(2 * rounded(n * e) + rounded(FP32) for n in numels)
    if opt == "paged-adamw":
        # bitsandbytes' 32-bit (paged) AdamW: two fp32 states whatever the parameter's dtype, `step` an int
        # (bitsandbytes/optim/optimizer.py Optimizer2State.init_state)
        return sum(2 * rounded(FP32 * n) for n in numels)
    if opt in ("adamw8bit", "paged-adamw8bit"):
        # bitsandbytes: uint8 states with one fp32 absmax per 256 values; tensors under 4096 elements keep fp32
        total = 0
        for n in numels:
            if n >= 4096:
                total += 2 * (rounded(n) + rounded(FP32 * math.ceil(n / 256)))
            else:
                total += 2 * rounded(FP32 * n)
        return total
    if opt == "sgd-momentum":
        return sum(rounded(n * e) for n in numels)
    return 0


def optimizer_temporaries(numels: list[int], plan: Plan) -> int:
    """Extra live bytes inside optimizer.step().

    torch AdamW foreach (CUDA default): `_multi_tensor_adamw` builds the bias-corrected denominator
    (exp_avg_sq.sqrt() / bias_correction2_sqrt + eps) for all tensors at once: one parameter-sized
    temporary; the step-size products are per-tensor scalars.  Without foreach, one tensor at a time.
    """
    e = trainable_element_bytes(plan)
    if not numels:
        return 0
    if plan.optimizer == "adamw":
        if plan.foreach:
            return sum(rounded(n * e) for n in numels)
        # one tensor at a time (`_single_tensor_adamw`): exp_avg_sq.sqrt() and its out-of-place division by
        # bias_correction2_sqrt are both alive, and the previous tensor's `denom` is still referenced until the
        # loop rebinds it
        sizes = [rounded(n * e) for n in numels]
        return max(2 * b + a for a, b in zip([0] + sizes, sizes))
    return 0  # SGD updates in place; bitsandbytes' steps (8- and 32-bit) are fused kernels


_STATIC: dict[tuple, Static] = {}


def cached_static_memory(card: ModelCard, plan: Plan) -> Static:
    """Weights, gradients and optimizer states do not depend on the step's shape: cached without it."""
    key = (card, plan.method, plan.r, plan.targets, plan.adapter_size, plan.adapter_placement, plan.top_k,
           plan.dtype, plan.optimizer, plan.foreach, plan.double_quant, plan.kbit_prep, plan.adapter_dtype,
           plan.use_dora)
    st = _STATIC.get(key)
    if st is None:
        if len(_STATIC) > 65536:
            _STATIC.clear()
        st = _STATIC[key] = static_memory(card, plan, count(card, plan))
    return st


def static_memory(card: ModelCard, plan: Plan, p: ParamCounts) -> Static:
    e, te = plan.bytes_per_element, trainable_element_bytes(plan)
    numels = trainable_tensors(card, plan)
    trainable = sum(rounded(n * te) for n in numels)
    if plan.method == "qlora":
        # embeddings, norms, output head: fp32 after k-bit preparation. Linear4bit casts its bias back to the
        # compute dtype in place on its first forward, so in steady state biases are e bytes.
        biases = sum(n * lin.d_out for lin, n in quantizable(card) if lin.bias)
        rest = p.frozen - p.quantized - biases
        frozen = qlora_weight_bytes(card, plan.double_quant) + rest * (FP32 if plan.kbit_prep else e) + biases * e
    else:
        frozen = p.frozen * e
    return Static(
        frozen_weights_bytes=frozen,
        trainable_weights_bytes=trainable,
        gradients_bytes=trainable,
        optimizer_states_bytes=optimizer_state_bytes(numels, plan),
        optimizer_temporaries_bytes=optimizer_temporaries(numels, plan),
        largest_gradient_bytes=rounded(max(block_tensors(card, plan) or numels) * te) if numels else 0,
    )


# ---------------------------------------------------------------- activations


def _lora_wrapped(card: ModelCard, plan: Plan) -> frozenset[str]:
    """Block linears LoRA wraps in any block."""
    if not plan.uses_lora:
        return frozenset()
    return frozenset(lin.name for lin, in_block, _ in lora_targets(card, plan.targets) if in_block)


def _groups(card: ModelCard) -> tuple[list[str], str, list[str], str]:
    """Block linears by role (layout.Linear.role): (reading the attention norm's output, attention output,
    FFN in, FFN out). A block without one of them (fused experts are parameters, not Linears) gives ""."""
    lin = layout(card).block_linears
    attn_in = [x.name for x in lin if x.role == "attn_in"]
    attn_out = next((x.name for x in lin if x.role == "attn_out"), "")
    ffn_in = [x.name for x in lin if x.role == "ffn_in"]
    ffn_out = next((x.name for x in lin if x.role == "ffn_out"), "")
    return attn_in, attn_out, ffn_in, ffn_out


def norm_saved(card: ModelCard, plan: Plan, weight_trains: bool) -> int:
    """Bytes per token a norm saves when its input needs a gradient.

    RMSNorm (Llama family) computes in fp32: the fp32 copy of x (4d) and rsqrt (4) are saved; γ·x̂ saves
    x̂ in the compute dtype only when γ trains. LayerNorm saves x (e·d), mean and rstd.
    """
    e, d = stream_element_bytes(plan, card), card.d_model
    if card.norm == "rmsnorm":
        # Gemma-2 multiplies by (1 + γ) in fp32 and casts after: x̂ is saved in fp32
        scaled = FP32 if card.model_type == "gemma2" else e
        return FP32 * d + FP32 + (scaled * d if weight_trains else 0)
    if plan.autocast != "none":  # autocast runs layer_norm in fp32: it saves the fp32 cast of x
        e = FP32
    return e * d + 2 * FP32


def block_saved_per_token(card: ModelCard, plan: Plan, trainable_block: bool, first: bool = False,
                          wrapped: frozenset[str] | None = None, part: str = "block") -> float:
    """Bytes per token one block saves for backward (part="block"), or (part="attention", eager attention) what
    is live per token while its attention runs the softmax's backward: what the block saved up to its attention
    kernel, and the probabilities' gradient beside the softmax's input gradient (b·h·s² each)."""
    if part == "block" and seq2seq.applies(card):  # T5's decoder block (planning/seq2seq.py)
        return seq2seq.block_saved_per_token(card, plan, trainable_block, first, wrapped)
    key = (card, plan.method, plan.r, plan.targets, plan.adapter_size, plan.adapter_placement, plan.dtype,
           plan.kbit_prep, plan.dropout, plan.attention, plan.seq_len if plan.attention == "eager" else 0,
           plan.adapter_dtype, plan.autocast,
           trainable_block, first, wrapped, part, families.block_key(card, plan))
    v = _BLOCK.get(key)
    if v is None:
        if len(_BLOCK) > 65536:
            _BLOCK.clear()
        v = _BLOCK[key] = _block_saved_per_token(card, plan, trainable_block, first, wrapped, part)
    return v


_BLOCK: dict[tuple, float] = {}


def _block_saved_per_token(card: ModelCard, plan: Plan, trainable_block: bool, first: bool = False,
                           wrapped: frozenset[str] | None = None, part: str = "block") -> float:
    """Bytes per token one block saves for backward (part="attention": see block_saved_per_token).

    A Linear saves its input when its weight trains or LoRA wraps it (lora_A reads the same input);
    inputs shared by several Linears are saved once. SDPA saves q, k, v, its output (which is also the
    attention output projection's input: flash kernels return it in (b, s, h, d_h) layout) and a fp32
    logsumexp per head. `first`: the lowest block of a frozen base that needs a gradient, whose input needs
    none. `wrapped`: the linears LoRA wraps in this block (default: those it wraps in any block).
    """
    c, e = card, activation_element_bytes(plan, card)
    d, f, q, k = c.d_model, c.d_ff, c.d_q, c.d_kv
    lora = _lora_wrapped(c, plan) if wrapped is None else wrapped
    attn_in, attn_out, ffn_in, ffn_out = _groups(c)

    # What a wrapped module's lora_A saves. peft's lora.Linear casts x to the adapter's dtype
    # (`_cast_input_dtype`); its 4-bit twin skips that cast under autocast (`torch.is_autocast_enabled()`); under
    # autocast lora_A's Linear then casts to the autocast dtype. A module whose cast chain returns x itself
    # shares x with the others; any cast makes (and saves) a copy per module.
    ac = DTYPES[plan.autocast] if plan.autocast != "none" else 0
    lb = trainable_element_bytes(plan) if lora else e
    ne = FP32 if ac and c.norm == "layernorm" else stream_element_bytes(plan, card)  # autocast runs layer_norm in fp32
    ce = ac or e  # what SDPA / the attention matmuls save (autocast casts their inputs)

    def group_saved(names: list[str], x: int, d_in: int) -> tuple[float, bool]:
        """(bytes per token the group's Linears save beyond a shared x, whether x itself is saved)."""
        copies, shared = 0.0, False
        for n in names:
            if trainable_block:  # a training base Linear saves its input (autocast's copy of it, if cast)
                copies += ac * d_in if ac and x != ac else 0
                shared |= not (ac and x != ac)
            elif n in lora:
                conv = x if (plan.method == "qlora" and ac) else lb
                saved = ac or conv
                if plan.dropout:
                    copies += (saved + 1) * d_in  # the dropout output (cast by lora_A under autocast), its mask
                elif conv == x and saved == x:
                    shared = True
                else:
                    copies += saved * d_in
        return copies, shared

    def saves(name: str) -> bool:  # does the Linear keep its (shared) input alive
        return group_saved([name], x_of[name], 1)[1]

    gelu_new_ac = bool(ac) and c.activation == "gelu_new"
    x_of = {n: ne for n in (*attn_in, *ffn_in)} | {attn_out: ce, ffn_out: FP32 if gelu_new_ac else e}
    norm_trains = trainable_block or plan.method == "adapter"
    g = _needs_grad(c, plan, trainable_block, first, lora)
    total = 0.0
    late = 0.0  # what is saved after the attention kernel (freed before its backward)
    # the norms whose input needs a gradient (Gemma-2's sandwich norms add two more on the sublayer outputs)
    norms, split = _norm_inputs_grad(c, g), 0 if _post_norm(c) else 1  # post-norms come after the attention
    total += sum(norms[:split]) * norm_saved(c, plan, norm_trains)
    late += sum(norms[split:]) * norm_saved(c, plan, norm_trains)
    # the newer families' terms (families.py); the q/k norms are not among the d-wide norms counted above
    total += families.block_correction(c, plan, stream_element_bytes(plan, c), ce, norm_saved(c, plan, norm_trains),
                                       norm_trains, saves(attn_out), (g.q, g.k), sum(norms))
    # normed inputs read by trained/wrapped Linears (the attention output and the MLP product are counted below)
    copies, shared = group_saved(attn_in, ne, d)
    total += copies + ne * d * shared
    copies, shared = group_saved(ffn_in, ne, d)
    late += copies + ne * d * shared
    late -= ne * d * families.one_norm_output(c, shared and group_saved(attn_in, ne, d)[1])  # Falcon: read once
    late += group_saved([attn_out], ce, q)[0] + group_saved([ffn_out], x_of[ffn_out], f)[0]
    late += sum(plan.r * (ac or lb) for n in lora if n not in attn_in)  # A·x, saved by B
    total += sum(plan.r * (ac or lb) for n in lora if n in attn_in)
    # attention; o_proj's input is the kernel's output (SDPA) or a copy of it (eager, Phi-3)
    o_in = ce * q * saves(attn_out)
    before_attention = total
    if part == "before_attention":  # saved before the attention kernel runs (planning/dora.py)
        return before_attention
    if not (g.q or g.k or g.v):  # lowest block of a frozen base, q/k/v not wrapped: only o_proj's input
        late += o_in
    elif plan.attention in ("sdpa", "flash"):  # flash_attention_2 saves the same: q, k, v, output, fp32 lse
        total += ce * (2 * q + 2 * k) + FP32 * c.n_heads  # q, k, v, output; logsumexp
        if _rope_by_cat(c):
            # v is a view of the fused qkv output, whose whole storage (q + 2k wide) stays saved beside the new
            # rotated q and k; the kernel's output follows the cat-made q's (b, h, s, d_h) layout, so
            # `transpose(1, 2).contiguous()` copies it, and o_proj saves that copy
            total += ce * (q + k)
            late += o_in
    else:
        total += _eager_saved(c, plan, g, e, ce)
        late += o_in
    if part == "attention" and families.sdpa_math(c, plan) and (g.q or g.k):  # Falcon's SDPA math path
        return families.sdpa_math_attention(c, plan, ce, before_attention, e)
    if part == "attention":
        if plan.attention != "eager" or not (g.q or g.k):
            return 0.0
        # q and k (saved by q·kᵀ) and the softmax output; v, the dropout's output and mask, and the cast the A·V
        # matmul read are freed with its backward
        sm = e if c.model_type in ("gpt2", "bert", "roberta") and not ac else FP32
        return before_attention + ce * q * (g.q + g.k) + (sm + 2 * max(sm, ce)) * c.n_heads * plan.seq_len
    # MLP
    if c.moe:  # router + experts in place of the MLP (planning/moe.py)
        late += moe.block_saved_per_token(c, plan, e, trainable_block)
    else:
        late += _mlp_saved(c, g, e, ce, f, saves(ffn_out), gelu_new_ac)
    if part == "mlp":
        # freed before an FFN input projection's base weight is used in backward: what the MLP and the down
        # projection saved, and (a frozen base) what the input projections' LoRA branches saved, whose backward
        # runs first (created after the base matmul, autograd runs it earlier)
        lora_in = 0.0 if trainable_block else (group_saved(ffn_in, ne, d)[0]
                                               + plan.r * (ac or lb) * sum(n in lora for n in ffn_in))
        return (_mlp_saved(c, g, e, ce, f, saves(ffn_out), gelu_new_ac) + group_saved([ffn_out], x_of[ffn_out], f)[0]
                + plan.r * (ac or lb) * (ffn_out in lora) + lora_in)
    if c.hidden_dropout > 0:
        late += d * (g.attn + g.out)  # a bool mask per sublayer output dropout whose input needs a gradient
    if plan.method == "adapter":
        m = plan.adapter_size
        per = e * d + 2 * e * m  # adapter input, bottleneck pre-activation and activation
        late += per * (2 if plan.adapter_placement == "houlsby" else 1)
    return total + late


@dataclass(frozen=True)
class _Grad:
    """Which tensors of a block need a gradient. In a trained block or above the lowest trained one, all; in
    the lowest block of a frozen LoRA base (whose input needs none), only those downstream of a wrapped Linear."""
    block_in: bool  # the block's input (not in the lowest block of a frozen base)
    q: bool  # the query (its projection wrapped, or anything upstream)
    k: bool
    v: bool
    attn: bool  # the attention sublayer's output (after o_proj)
    gate: bool  # the FFN's inner activations: the gate projection's output (non-gated: the up projection's)
    up: bool
    out: bool  # the FFN sublayer's output (after the down projection)


def _needs_grad(card: ModelCard, plan: Plan, trainable_block: bool, first: bool, lora: frozenset[str]) -> _Grad:
    if trainable_block or not first or not plan.uses_lora:
        return _Grad(not first or trainable_block, *([True] * 7))
    lin = {x.name: x for x in layout(card).block_linears}
    attn_in, attn_out, ffn_in, ffn_out = _groups(card)

    def part(role: str) -> bool:  # a wrapped attention input projection producing q, k or v
        return any(n in lora and _qkv_part(lin[n], card, role) for n in attn_in)

    q, k, v = part("q"), part("k"), part("v")
    attn = q or k or v or attn_out in lora
    # gate_proj, up_proj, Phi-3's fused gate_up_proj; a non-gated FFN's one input projection is both
    ffn_x = families.ffn_input_grad(card, False, attn)  # the FFN's input: after attention, or x (parallel)
    gate = ffn_x or any(n in lora and ("gate" in n or not card.gated_mlp) for n in ffn_in)
    up = ffn_x or any(n in lora and ("gate" not in n or "up" in n.rsplit(".", 1)[-1]) for n in ffn_in)
    return _Grad(False, q, k, v, attn, gate, up, gate or up or ffn_out in lora)


def block_cache_bytes(card: ModelCard, plan: Plan, lowest: bool, ffn_only: bool = False) -> int:
    """Mixed precision: the autocast-dtype weight copies one block's Linears save for backward (those whose
    input needs a gradient: in the lowest block of a frozen LoRA base, only some). 0 otherwise."""
    if not plan.mixed_precision or plan.method == "qlora":
        return 0
    lin = layout(card).block_linears
    names = {x.name for x in lin}
    if lowest and plan.grad_checkpointing:  # every block's input needs a gradient (enable_input_require_grads)
        pass
    elif lowest and plan.uses_lora:
        _, wrapped = lowest_lora_block(card, plan)
        names = set(_grad_input_linears(card, _needs_grad(card, plan, False, True, wrapped)))
    elif lowest and plan.method == "top" and autocast_copies.attention_reads_block_input(card):
        names -= set(_groups(card)[0])  # they read the block's input, which needs no gradient
    if ffn_only:  # the FFN's (freed once its backward is done)
        _, _, ffn_in, ffn_out = _groups(card)
        names &= {*ffn_in, ffn_out}
    return DTYPES[plan.autocast] * sum(x.weight_numel + (x.d_out if x.bias else 0) for x in lin if x.name in names)


def top_quiet_copies_bytes(card: ModelCard, plan: Plan) -> int:
    """Mixed precision, top-k, post-norm (and OLMo-2) blocks: the lowest trained block's attention input Linears read its
    input, which needs no gradient, so their weight copies (cached through forward: trainable leaves) are not
    saved for backward. (A pre-norm block's trained norm comes first: its output needs a gradient.)"""
    if plan.method != "top" or not plan.mixed_precision or not autocast_copies.attention_reads_block_input(card):
        return 0
    attn_in = set(_groups(card)[0])
    return DTYPES[plan.autocast] * sum(x.weight_numel + (x.d_out if x.bias else 0)
                                       for x in layout(card).block_linears if x.name in attn_in)


def lowest_lora_block(card: ModelCard, plan: Plan) -> tuple[int, frozenset[str]]:
    """(index, wrapped Linears) of the lowest block LoRA wraps something in (the lowest that needs a gradient)."""
    sets = lora_block_sets(card, plan.targets) if card.n_layers else ()
    low = next((i for i, names in enumerate(sets) if names), 0)
    return low, (sets[low] if sets else frozenset())


def _grad_input_linears(card: ModelCard, g: _Grad) -> list[str]:
    """The block Linears whose input needs a gradient (autograd then saves their weights' autocast copies)."""
    attn_in, attn_out, ffn_in, ffn_out = _groups(card)
    ffn_x = families.ffn_input_grad(card, g.block_in, g.attn)  # after attention, or x (parallel blocks)
    return ([n for n in attn_in if g.block_in] + [attn_out] * (g.q or g.k or g.v) + [n for n in ffn_in if ffn_x]
            + [ffn_out] * (g.gate or g.up))


def _qkv_part(lin, card: ModelCard, role: str) -> bool:
    """Whether an attention input Linear produces q, k or v: fused ones (GPT-2's c_attn, Phi-3's qkv_proj)
    all three; separate ones by name (q_proj / query, ...)."""
    if lin.d_out == card.d_q + 2 * card.d_kv:
        return True
    return lin.name.rsplit(".", 1)[-1][0] == role  # q_proj / query, k_proj / key, v_proj / value


def _norm_inputs_grad(card: ModelCard, g: _Grad) -> list[bool]:
    """For each block norm (layout order), whether its input needs a gradient. Pre-norm blocks read the block's
    input, then the residual after attention (Gemma-2: also the attention output, and the FFN output);
    post-norm blocks (BERT, RoBERTa, OPT-350m) normalise each sublayer's residual sum."""
    if _post_norm(card):
        return [g.attn, g.out]
    # d-wide norms of the residual stream (not q/k norms, not MLA's latent norms): Gemma-3's four, as Gemma-2's
    qk = {n.name for n in families.qk_norms(card)}
    wide = sum(n.size == card.d_model and n.name not in qk for n in layout(card).block_norms)
    if card.sandwich_norms or wide == 4:
        return [g.block_in, g.attn, g.attn, g.out]
    if card.parallel_block:  # every norm of a parallel block reads the block's input (families.py)
        return [g.block_in] * wide
    return [g.block_in, g.attn]


def _post_norm(card: ModelCard) -> bool:
    """Blocks that normalise after each residual add (BERT, RoBERTa, OPT-350m: `do_layer_norm_before=False`,
    hence no final norm); the others normalise each sublayer's input."""
    return card.encoder or (card.model_type == "opt" and not card.final_norm)


def _eager_saved(card: ModelCard, plan: Plan, g: _Grad, e: int, ce: int) -> float:
    """Bytes per token eager attention saves: q, k (repeated to h heads), v (repeated), the softmax output
    (fp32 in the Llama family and OPT, the input dtype in GPT-2 and BERT), and what the A·V matmul reads: the
    dropout output (with its bool mask) or the softmax cast back to the compute dtype (a no-op when they
    agree). Each only when what it is saved for needs a gradient: q·kᵀ saves q for k's gradient and k for q's;
    A·V saves A for v's and v for A's."""
    q, heads, s = card.d_q, card.n_heads, plan.seq_len
    scores = g.q or g.k
    sm = e if card.model_type in ("gpt2", "bert", "roberta") and plan.autocast == "none" else FP32
    total = ce * q * (g.k + g.q + scores)  # q, k, v (k and v repeated to h heads)
    if card.attention_dropout > 0:
        probs = sm * scores + scores + ce * g.v  # softmax output, mask, dropout output
    elif sm != ce:
        probs = sm * scores + ce * g.v  # softmax output, its cast
    else:
        probs = sm * (scores or g.v)  # one tensor
    return total + probs * heads * s


def _mlp_saved(card: ModelCard, g: _Grad, e: int, ce: int, f: int, down_saves: bool, gelu_new_ac: bool) -> float:
    """Bytes per token the MLP saves between its input and output projections (the down projection's input
    counted when it saves it). The activation saves its input when the gate's output needs a gradient; the
    gated product saves each factor when the other needs one."""
    g = families.glu_grad(card, g)  # a GLU chunked from one Linear's output (ModernBERT's Wi)
    if card.gated_mlp:  # gate, act(gate), up; their product if down saves it
        return e * f * (g.gate + g.gate + g.up + down_saves)
    if card.activation == "relu":
        return e * f * (g.gate or down_saves)  # ReLU keeps its output, which is also the down projection's input
    # GELU keeps its input (+ its output for a training down projection); GPT-2's "gelu_new" is Python ops:
    # x, tanh(·), 0.5·x and 1 + tanh(·) are kept. Under autocast pow(x, 3) is a fp32-list op: it keeps a fp32
    # copy of x, and tanh(·), 1 + tanh(·) and the output are fp32 (0.5·x stays in ce)
    if gelu_new_ac:
        return g.gate * f * (3 * FP32 + ce) + FP32 * f * down_saves
    return e * f * ((4 if card.activation == "gelu_new" else 1) * g.gate + down_saves)


def _rope_by_cat(card: ModelCard) -> bool:
    """Phi-3 reads q, k and v from one fused qkv_proj output and rotates q and k with
    `torch.cat([rotated, passed], dim=-1)` (transformers models/phi3 `apply_rotary_pos_emb`, partial rotary):
    new contiguous q and k, while v stays a view of the fused output."""
    return card.model_type == "phi3"


def outside_saved_per_token(card: ModelCard, plan: Plan) -> float:
    """Bytes per token saved outside the blocks: embeddings, final norm, output head (and MLM head)."""
    if seq2seq.applies(card):  # T5's encoder stack and its decoder's outside (planning/seq2seq.py)
        return seq2seq.outside_saved_per_token(card, plan)
    c, e, d = card, activation_element_bytes(plan, card), card.d_model
    full = plan.method == "full"
    norms_train = full or plan.method == "adapter"
    total = 0.0
    if c.encoder:
        # the embedding LayerNorm (and dropout) save for backward when something below trains, or when
        # checkpointing makes the embedding output need a gradient (enable_input_require_grads)
        if full or plan.method == "adapter" or plan.grad_checkpointing:
            total += norm_saved(c, plan, norms_train)
        total += d * (c.embed_dropout > 0 and (full or plan.grad_checkpointing))
        # MLM head: dense (its input), GELU (input), LayerNorm (input, stats), decoder (its input)
        total += e * d * full + e * d + norm_saved(c, plan, norms_train) + e * d * full
        return total
    if c.final_norm:
        total += norm_saved(c, plan, norms_train)
    total += e * c.d_embed * full  # the output head's input, when the head (tied embedding) trains
    if c.embed_proj_dim:
        total += e * d * full  # project_out's input
    total += d * (c.embed_dropout > 0 and full)
    return total


@dataclass(frozen=True)
class Activations:
    saved_bytes: int  # saved for backward by all blocks and the final norm at the end of forward
    block_bytes: int  # one block's saved tensors (what a checkpointed block recomputes)
    first_block_bytes: int  # the lowest trained block's saved tensors (block 0's in a frozen base)
    frozen_below: int  # checkpointed: frozen blocks below the lowest trained one, which run backward too
    frozen_block_bytes: int  # one such block's saved tensors (recomputed in backward)
    # eager attention: live while the top / lowest trained / lowest frozen block runs its softmax's backward
    # (what it saved up to the attention kernel and two b·h·s² gradients); 0 otherwise
    top_attention_bytes: int
    first_attention_bytes: int
    frozen_attention_bytes: int
    top_block_bytes: int  # the top block's (the first to run backward)
    outside_bytes: int  # saved outside the blocks (final norm, head input), freed before the blocks' backward
    checkpoint_bytes: int  # with checkpointing, one block's kept input (0 without)
    logits_forward_bytes: int  # logits, fp32 upcast and log-softmax during the loss
    logits_backward_bytes: int  # live while the loss backpropagates


def activations(card: ModelCard, plan: Plan) -> Activations:
    c, e, t = card, activation_element_bytes(plan, card), plan.tokens
    L, V, d = c.n_layers, c.vocab_size, c.d_model
    # checkpointed, transformers' gradient_checkpointing_enable calls enable_input_require_grads: the embedding
    # output needs a gradient, so every block (frozen ones below the trained ones too) keeps its input, is
    # recomputed and runs its backward; no block is the quiet lowest one
    ckpt = plan.grad_checkpointing
    frozen_below = 0  # blocks below the lowest trained one that still run backward (checkpointed)
    # each block as block_saved_per_token's (trainable_block, first, wrapped), bottom to top
    if plan.method == "full":
        specs = [(True, False, None)] * L
    elif plan.method == "top":
        # blocks below the trained ones need no input gradient and save nothing (unless checkpointed)
        frozen_below = (L - plan.top_k) * ckpt
        specs = [(False, False, None)] * frozen_below + [(True, False, None)] * plan.top_k
    elif plan.uses_lora and len(sets := lora_block_sets(c, plan.targets)) and len(set(sets)) > 1:
        # targets naming some blocks: blocks below the lowest wrapped one need no gradient and save nothing
        low = next(i for i, names in enumerate(sets) if names)
        frozen_below = low * ckpt
        specs = [(False, i == low and not ckpt, sets[i]) for i in range(low - frozen_below, L)]
    else:
        specs = [(False, not ckpt, None)] + [(False, False, None)] * (L - 1)
    blocks = [block_saved_per_token(c, plan, *spec) for spec in specs]
    attn = [block_saved_per_token(c, plan, *spec, part="attention") for spec in specs]
    blocks = [x + moe.lora_merged_bytes(c, plan) / t for x in blocks]  # peft's merged expert stacks, per block
    blocks = moe.dense_block_adjust(c, plan, blocks, e)  # dense first blocks of a MoE (planning/moe.py)
    blocks = dora.blocks_saved(c, plan, blocks)  # DoRA's saved tensors per block (planning/dora.py)
    # transformers' causal-LM loss upcasts logits to fp32; the masked-LM loss of BERT/RoBERTa does not
    # (autocast runs cross_entropy in fp32); the head is a Linear: under autocast the logits are in its dtype
    ac = plan.autocast != "none"
    x = e if (c.encoder or seq2seq.applies(c)) and not ac and not families.mlm_loss_upcasts(c) else FP32
    lg = DTYPES[plan.autocast] if ac else e
    # Gemma-2 soft-caps the logits, cap·tanh(z/cap): tanh's output is saved for backward
    cap = lg if families.logit_softcap(c) else 0
    if ckpt:
        kept = len(blocks) * stream_element_bytes(plan, card) * d  # each checkpointed block keeps only its input
    else:
        kept = sum(blocks)
    final = (outside_saved_per_token(c, plan) + families.mask_saved_per_token(c, plan)
             + families.outside_correction(c, plan) + dora.outside_saved_per_token(c, plan))
    return Activations(
        saved_bytes=int((kept + final) * t),
        block_bytes=int(max(blocks, default=0) * t),
        first_block_bytes=int(blocks[frozen_below] * t) if blocks else 0,
        frozen_below=frozen_below,
        frozen_block_bytes=int(blocks[0] * t) if frozen_below else 0,
        top_attention_bytes=int(attn[-1] * t) if attn else 0,
        first_attention_bytes=int(attn[frozen_below] * t) if attn else 0,
        frozen_attention_bytes=int(attn[0] * t) if frozen_below else 0,
        top_block_bytes=int(blocks[-1] * t) if blocks else 0,
        outside_bytes=int(final * t),
        checkpoint_bytes=int(e * d * t) if plan.grad_checkpointing and blocks else 0,
        # logits, their fp32 copy (none when already fp32), the log-softmax output
        logits_forward_bytes=int((lg + (x if lg != x else 0) + x + cap) * t * V)  # logits, fp32 copy, log-softmax
        + shift_copy_bytes(c, plan) + shifted_rows_bytes(c, plan, 1),  # transformers <= 4.48 (planning/loss.py)
        logits_backward_bytes=int((3 * x + cap) * t * V)  # saved log-softmax, its gradient, the input gradient
        + shifted_rows_bytes(c, plan, 3),
    )


# ---------------------------------------------------------------- phases


def _gpu_terms(tensor_bytes: int, phase: str) -> tuple[int, int]:
    """(CUDA context + cuBLAS workspace, caching-allocator reserve beyond the live bytes) for a phase's peak."""
    return CUDA_CONTEXT_BYTES + CUBLAS_WORKSPACE_BYTES, int((RESERVED_PER_LIVE[phase] - 1) * tensor_bytes)


def _memory(phase: str, st: Static, **live: int) -> Memory:
    tensor = (st.frozen_weights_bytes + st.trainable_weights_bytes + live.get("gradients_bytes", 0)
              + st.optimizer_states_bytes + live.get("activations_bytes", 0) + live.get("logits_bytes", 0)
              + live.get("temporaries_bytes", 0))
    ctx, frag = _gpu_terms(tensor, phase)
    return Memory(
        phase=phase,
        frozen_weights_bytes=st.frozen_weights_bytes,
        trainable_weights_bytes=st.trainable_weights_bytes,
        gradients_bytes=live.get("gradients_bytes", 0),
        optimizer_states_bytes=st.optimizer_states_bytes,
        activations_bytes=live.get("activations_bytes", 0),
        logits_bytes=live.get("logits_bytes", 0),
        temporaries_bytes=live.get("temporaries_bytes", 0),
        cuda_context_bytes=ctx,
        allocator_overhead_bytes=frag,
    )


def embedding_backward_bytes(card: ModelCard, plan: Plan) -> int:
    """Full fine-tuning, end of backward: every other gradient exists while the token embedding's is
    computed (embedding_dense_backward) and, when tied, summed with the head's."""
    if plan.method != "full":
        return 0
    e, vd = plan.bytes_per_element, card.vocab_size * card.d_embed
    # tied: the head's gradient waits in autograd's input buffer and is summed with the embedding's
    live = 3 * e if card.tie_embeddings else e
    return (live - e) * vd  # beyond the gradients, of which the embedding's own is not yet one


def first_gradients_bytes(card: ModelCard, plan: Plan) -> int:
    """Gradients that arrive last in backward, after the lowest trained block started its backward: that
    block's own (every method) and, for full fine-tuning, the embeddings'."""
    if plan.method == "full":
        return _first_gradients_elements(card) * plan.bytes_per_element
    return block_gradients_bytes(card, plan)


def block_gradients_bytes(card: ModelCard, plan: Plan) -> int:
    """Bytes of one block's gradients (rounded per tensor as the allocator rounds them)."""
    te = trainable_element_bytes(plan)
    return sum(rounded(n * te) for n in block_tensors(card, plan))


def block_ffn_gradients_bytes(card: ModelCard, plan: Plan) -> int:
    """Bytes of one trained block's FFN weight (and bias) gradients."""
    te = trainable_element_bytes(plan)
    _, _, ffn_in, ffn_out = _groups(card)
    return sum(rounded(x.weight_numel * te) + (rounded(x.d_out * te) if x.bias else 0)
               for x in layout(card).block_linears if x.name in (*ffn_in, ffn_out))


def block_tensors(card: ModelCard, plan: Plan) -> list[int]:
    """numel of each trainable tensor of one block (LoRA: of every block's wrapped Linears together)."""
    lay = layout(card)
    if plan.method in ("full", "top"):
        per = [x.weight_numel for x in lay.block_linears] + [x.d_out for x in lay.block_linears if x.bias]
        per += [n.size for n in lay.block_norms] + [n.size for n in lay.block_norms if n.bias]
        per += [p.numel for p in lay.block_params]
    elif plan.method == "adapter":
        m, d = plan.adapter_size, card.d_model
        per = [m * d, m, d * m, d] * (2 if plan.adapter_placement == "houlsby" else 1)
        per += [n.size for n in lay.block_norms] + [n.size for n in lay.block_norms if n.bias]
    else:
        per = [n for lin, in_block, _ in lora_targets(card, plan.targets) if in_block
               for n in (plan.r * lin.d_in, lin.d_out * plan.r) + ((lin.d_out,) if plan.use_dora else ())]
    return per


@lru_cache(maxsize=1024)
def _first_gradients_elements(card: ModelCard) -> int:
    lay = layout(card)
    block = sum(x.numel for x in lay.block_linears) + sum(n.numel for n in lay.block_norms)
    block += sum(p.numel for p in lay.block_params)
    return block + sum(x.numel for x in lay.embeddings)


def _ffn_out_and_rest_numel(card: ModelCard) -> tuple[int, int]:
    """(the FFN output projection's weight numel, the largest other block Linear's)."""
    _, _, _, ffn_out = _groups(card)
    lin = layout(card).block_linears
    out = next((x.weight_numel for x in lin if x.name == ffn_out), 0)
    return out, max((x.weight_numel for x in lin if x.name != ffn_out), default=0)


def _ffn_out_and_rest_gradient_bytes(card: ModelCard, plan: Plan) -> tuple[int, int]:
    """Trained block: (the FFN output projection's weight (and bias) gradient bytes, the largest other
    trainable tensor's)."""
    te = trainable_element_bytes(plan)
    _, _, _, ffn_out = _groups(card)
    lin = layout(card).block_linears
    out = sum(rounded(n * te) for x in lin if x.name == ffn_out for n in (x.weight_numel, x.d_out)[:1 + bool(x.bias)])
    down = next((x.weight_numel for x in lin if x.name == ffn_out), None)
    rest = list(block_tensors(card, plan))
    if down in rest:
        rest.remove(down)
    return out, rounded(max(rest, default=0) * te)


def _after_ffn_bytes(card: ModelCard, plan: Plan, ae: int, trainable_block: bool) -> int:
    """Live beyond a block's saved tensors when its FFN input projections run their backward: the gradient of
    their outputs and of their input, less what the MLP and its down projection saved (freed by then). Can be
    negative."""
    _, _, ffn_in, _ = _groups(card)
    lin = {x.name: x for x in layout(card).block_linears}
    width = sum(lin[n].d_out for n in ffn_in)
    freed = block_saved_per_token(card, plan, trainable_block, part="mlp")
    return int((ae * (card.d_model + width) - freed) * plan.tokens)


def _down_wrapped(card: ModelCard, plan: Plan) -> bool:
    """Does LoRA wrap the FFN output (down) projection (its lora_A then saves the FFN product)?"""
    return plan.uses_lora and _groups(card)[3] in _lora_wrapped(card, plan)


def lora_down_proj_grads(card: ModelCard, plan: Plan, ae: int) -> int:
    """Bytes beyond the generic frozen FFN working set while LoRA on the FFN output projection runs its backward
    with LoRA dropout and adapter weights wider than the activations (peft's fp32 default, no autocast): the
    output gradient cast to the adapter dtype and scaled (d-wide; reentrant recomputation holds both), lora_A's
    input gradient and the dropout backward's output, f-wide each in the adapter dtype, where the generic set has
    two f-wide activation-dtype gradients. (Without dropout the generic set holds: measured.)
    Source: peft tuners/lora/layer.py Linear.forward (`_cast_input_dtype`, `lora_dropout`); torch's mm and
    native_dropout backward (derivatives.yaml)."""
    lb = trainable_element_bytes(plan)
    if not plan.uses_lora or not plan.dropout or plan.mixed_precision or card.moe or lb <= ae \
            or plan.method == "qlora":
        return 0
    if not _down_wrapped(card, plan):
        return 0
    f, d = card.d_ff, card.d_model
    held = 2 if plan.grad_checkpointing and plan.use_reentrant else 1  # reentrant: the unscaled cast still held
    return max(0, 2 * lb * f + held * lb * d - 2 * ae * f) * plan.tokens


def attention_grads_in_flight(card: ModelCard, plan: Plan, ae: int) -> int:
    """Gradients in flight while the lowest trained block runs its eager softmax's backward, beyond what
    `block_saved_per_token(part="attention")` counts: the attention output's gradient (d-wide, o_proj's input
    gradient reshaped) and v's gradient from the A·V matmul's backward at h heads (d_q wide).
    Source: torch's bmm backward (derivatives.yaml); transformers' eager_attention_forward."""
    if plan.attention != "eager" or card.moe:
        return 0
    return (ae * card.d_model + ae * card.d_q) * plan.tokens


def frozen_attention_grads(card: ModelCard, plan: Plan, ae: int) -> int:
    """Gradients in flight while a recomputed frozen block (below the trained ones, checkpointed) runs its eager
    softmax's backward, beyond what `block_saved_per_token(part="attention")` counts: the block output's
    gradient (the residual's), the FFN branch's input gradient and their sum (the attention sublayer's output
    gradient), d-wide each, and v's gradient from the A·V matmul's backward at h heads (d_q wide).
    Source: autograd's engine (a residual add passes one gradient to both branches; the branches' input
    gradients are summed in its input buffer); torch's bmm backward (derivatives.yaml)."""
    if plan.attention != "eager" or card.moe:
        return 0
    # attention_grads_in_flight's two (the sublayer output's, v's), and the residual's and FFN branch's
    return attention_grads_in_flight(card, plan, ae) + 2 * ae * card.d_model * plan.tokens


def top_end_in_flight(card: ModelCard, plan: Plan, ae: int, kept: int) -> int:
    """Top-k, the end of backward (every gradient made): what the lowest trained block still holds besides.
    At its first Linear's weight gradient: the input norm's two saved d-wide tensors (its output, read by the
    q/k/v projections, and the normalised input its trained weight's gradient reads), the norm output's gradient
    being accumulated, the projection's input gradient and the query's gradient (d_q wide). Checkpointed with no
    frozen block below, the block's input needs a gradient (`enable_input_require_grads`): its kept input stays,
    and an RMSNorm (Python ops in fp32) then runs its backward: six fp32 d-wide tensors, with the incoming
    gradient in the stream dtype. Not modelled under mixed precision (the copies' moment above) or for MoE.
    Source: transformers' LlamaRMSNorm / nn.LayerNorm; autograd's mm backward (derivatives.yaml)."""
    if plan.mixed_precision or card.moe or card.encoder:
        return 0
    d, t = card.d_model, plan.tokens
    first_linear = (4 * ae * d + ae * card.d_q) * t
    norm_bwd = (6 * FP32 + (ae if ae != FP32 else 0)) * d * t if kept and card.norm == "rmsnorm" else 0
    return kept + max(first_linear, norm_bwd)


def dequantized_weight_bytes(card: ModelCard, plan: Plan, numel: int | None = None) -> int:
    """QLoRA: the largest block Linear4bit's weight dequantized in the compute dtype during its backward
    (bitsandbytes MatMul4Bit.backward: dequantize_4bit(B).to(grad.dtype), a copy for fp32 models), plus the fp32
    absmax a double-quantized weight dequantizes first (one per 64 weights). 0 for other methods."""
    if plan.method != "qlora":
        return 0
    n = max(lin.weight_numel for lin in layout(card).block_linears) if numel is None else numel
    # dequantized in the 16-bit compute dtype; a fp32 model's gradient is fp32, so the cast makes a fp32 copy
    deq = rounded(2 * n) + (rounded(FP32 * n) if plan.dtype == "fp32" else 0)
    return deq + (rounded(FP32 * (n // 64)) if plan.double_quant else 0)


def hidden_at_loss_bytes(card: ModelCard, plan: Plan) -> int:
    """The final hidden state (the head's input), alive while transformers' CausalLM forward computes the loss
    (its output object holds it); counted among the saved tensors already when the head trains."""
    if card.encoder or plan.method == "full":
        return 0
    # autocast runs the final LayerNorm in fp32: its output, the head's input, is fp32
    ln32 = plan.autocast != "none" and card.norm == "layernorm" and card.final_norm
    return (FP32 if ln32 else activation_element_bytes(plan, card)) * card.d_embed * plan.tokens


def shared_input_bytes(card: ModelCard, plan: Plan) -> int:
    """Checkpointed: the part of a block's saved tensors that is its kept input itself. LayerNorm saves its
    input as is; RMSNorm saves its fp32 copy, the input itself when activations are fp32. Block 0 of a frozen
    base saves nothing of its input."""
    if not plan.grad_checkpointing or (card.n_layers == 1 and plan.method not in ("full", "top")):
        return 0
    ae = activation_element_bytes(plan, card)
    if card.norm == "layernorm" or ae == FP32:
        return ae * card.d_model * plan.tokens
    return 0


def phases(card: ModelCard, plan: Plan) -> tuple[Memory, Memory, Memory]:
    """The live tensors at each phase's peak: (forward, backward, optimizer).

    Which tensors are alive together (each candidate below is one moment of the step; a phase's peak is the
    largest):
      forward   the loss: every saved tensor (or, checkpointed, each block's input) plus the logits, their fp32
                copy and log-softmax; checkpointed, also the last block running with nothing saved beside it.
      backward  start: the saved tensors plus the loss's gradient through the logits (no gradient yet);
                top block: every block's saved tensors (checkpointed: kept inputs, and the top block
                recomputed) and the gradients flowing through its FFN, before any weight gradient exists;
                lowest trained block: almost every gradient (not yet that block's own, nor the embeddings'),
                that block's saved (or recomputed) tensors and its backward working set, and the largest
                gradient being written; full fine-tuning: the embedding's gradient computed last; top-k: every
                gradient at the end; checkpointed with frozen blocks below the trained ones: their backward with
                every gradient made; eager attention: the top and lowest blocks' softmax backward (after the
                FFN's saved tensors are freed). Under mixed precision each block moment also holds that block's
                autocast weight copies.
      optimizer every gradient plus the optimizer's (or clipping's) temporaries.
    Sources: torch.utils.checkpoint (non-reentrant: recompute on first unpack of a block's saved tensor),
    autograd's engine (gradients accumulate as each parameter's backward runs).
    """
    st = cached_static_memory(card, plan)
    act = activations(card, plan)
    ae, t, f, d = activation_element_bytes(plan, card), plan.tokens, card.d_ff, card.d_model
    ckpt = plan.grad_checkpointing
    # the working set of one block beyond what it saves: its FFN intermediates (forward, when a checkpointed
    # block saves nothing) and the gradients flowing through it (backward)
    ffn_fwd = ((4 if card.gated_mlp else 2) * ae * f + 2 * ae * d) * t
    ffn_bwd = ((3 if card.gated_mlp else 2) * ae * f + 2 * ae * d) * t
    # the top block's backward begins with its FFN's: a trained down projection's input gradient and the
    # gated product's two factor gradients; a frozen one (LoRA/QLoRA/adapter) adds base and LoRA input gradients
    trained_base = plan.method in ("full", "top")
    # a gated product's mul backward makes both factors' gradients while the incoming one (the down projection's
    # input gradient) is still alive: 3 f-wide; a LoRA-wrapped down projection's saved input (lora_A's) is freed by
    # its backward just before, which leaves 2 more than that freed copy
    ffn_bwd_frozen = ((3 - _down_wrapped(card, plan) if card.gated_mlp else 1) * ae * f + ae * d) * t
    ffn_bwd_top = ffn_bwd if trained_base else ffn_bwd_frozen
    if trained_base and card.gated_mlp:
        # a trained down projection's saved input (the gated product) is freed by its backward, before the
        # product's two factor gradients are made
        ffn_bwd_top = ffn_bwd - ae * f * t
    if card.activation == "gelu_new" and not card.gated_mlp and not card.moe:
        # GPT-2/GPT-J's gelu_new is a product, (0.5·x)·(1 + tanh(·)) (fp32 under autocast: tanh is computed on
        # pow's fp32 output): its mul backward makes both factors' gradients beside the incoming one
        # (a trained down projection's saved input, or its autocast copy, is freed by its backward before)
        pe = FP32 if plan.autocast != "none" else ae
        ffn_bwd = max(ffn_bwd, (3 * pe * f - (DTYPES[plan.autocast] if plan.autocast != "none" else ae) * f
                                + 2 * ae * d) * t)
        ffn_bwd_frozen = max(ffn_bwd_frozen, (3 * pe * f + ae * d) * t)
        ffn_bwd_top = ffn_bwd if trained_base else ffn_bwd_frozen
    ffn_bwd_frozen += lora_down_proj_grads(card, plan, ae)
    if not trained_base:
        ffn_bwd_top = ffn_bwd_frozen
    if card.moe:  # the experts' working set in place of the MLP's (planning/moe.py)
        ffn_fwd, ffn_bwd, ffn_bwd_top = moe.working_bytes(card, plan, ae, trained_base)
        ffn_bwd_frozen = moe.working_bytes(card, plan, ae, False)[2]
    # QLoRA: each Linear4bit's backward dequantizes its weight; with the gradient arriving, this can
    # outweigh the FFN's gradients when tokens are few. The down projection's is dequantized first, beside the
    # FFN's whole working set; the wider input projections' (and attention's) after the FFN's intermediates died
    quiet = dequant.quiet_block_ffn_backward(card, plan, ae, ffn_bwd_frozen)  # the lowest block's (dequant.py)
    deq = dequantized_weight_bytes(card, plan)
    early_out = 0
    if deq and not card.moe:
        out_numel, in_numel = _ffn_out_and_rest_numel(card)
        deq_out = dequantized_weight_bytes(card, plan, out_numel) + ae * d * t
        deq_in = (dequantized_weight_bytes(card, plan, in_numel) + _after_ffn_bytes(card, plan, ae, trained_base)
                  - dequant.input_grad_overcount(card, plan))
        early_out = deq_out if dequant.down_proj_before_recompute(card, plan) else 0
        ffn_bwd, ffn_bwd_top, ffn_bwd_frozen = (max(x, 0 if early_out else deq_out, deq_in)
                                                for x in (ffn_bwd, ffn_bwd_top, ffn_bwd_frozen))
    elif deq:
        ffn_bwd, ffn_bwd_top, ffn_bwd_frozen = (max(x, deq + ae * card.d_model * t)
                                                for x in (ffn_bwd, ffn_bwd_top, ffn_bwd_frozen))
    # a trained block's weight gradients while the lowest trained block runs its backward: the down projection's
    # is written beside its input's gradient and the block's output gradient (autograd's mm backward), the larger
    # input projections' after the FFN's intermediates died; each new one, accumulating, is added into `.grad` and
    # freed, else it stays as `.grad` (not among `late`)
    largest = moe.lowest_block_gradient(card, plan, st.largest_gradient_bytes)  # merged expert stacks: moe.py
    low_ckpt, low = ffn_bwd_top + largest, ffn_bwd + largest
    if quiet is not None:  # QLoRA's lowest wrapped block dequantizes only where its input needs a gradient
        low, ffn_bwd_top = quiet + largest, quiet if dequant.top_is_lowest(card, plan) else ffn_bwd_top
    if trained_base and not card.moe:
        g_out, g_in = _ffn_out_and_rest_gradient_bytes(card, plan)
        kept = g_out * (plan.grad_accum == 1)
        down = autocast_copies.down_copy_freed_bytes(card, plan)  # its copy died with its node (autocast_copies.py)
        low_ckpt = low = max(ffn_bwd_top + kept - down, ae * t * (2 * d + f) + g_out,
                             _after_ffn_bytes(card, plan, ae, True) + g_in + kept - down)
    inputs = act.saved_bytes - act.outside_bytes  # checkpointed: the blocks' kept inputs
    # the autocast cache (low-precision copies of the weights): through forward all of them (checkpointed: the
    # cached trainable ones and the head's; frozen weights' copies inside checkpointed blocks are not saved and
    # die at once); in backward, checkpointed blocks saved no copies: the region's cache died with it
    fwd_cache = bwd_cache = autocast_cache_bytes(card, plan)
    if ckpt and plan.method not in ("full", "top"):
        fwd_cache = autocast_cache_bytes(card, plan, blocks=False) + autocast_lora_bytes(card, plan)
    if ckpt and families.block_casts_uncached(card):  # Falcon's `input @ weight.T`: no cached block copies
        fwd_cache = autocast_cache_bytes(card, plan, blocks=False) + autocast_lora_bytes(card, plan)
    if ckpt:
        bwd_cache = autocast_cache_bytes(card, plan, blocks=False)
    elif plan.method == "top" and plan.mixed_precision:
        bwd_cache -= top_quiet_copies_bytes(card, plan)
    # gradient accumulation: from the second micro-step on, every gradient lives through forward and backward
    # (new ones are added in place, AccumulateGrad, one at a time); the peak is such a micro-step
    accum = plan.grad_accum > 1
    grads_all = st.gradients_bytes if accum else 0
    # forward
    at_loss = act.saved_bytes + act.logits_forward_bytes + hidden_at_loss_bytes(card, plan)
    if ckpt and inputs + ffn_fwd > at_loss:
        fwd = _memory("forward", st, activations_bytes=inputs + ffn_fwd, temporaries_bytes=fwd_cache,
                      gradients_bytes=grads_all)
    else:
        fwd = _memory("forward", st, activations_bytes=act.saved_bytes + hidden_at_loss_bytes(card, plan),
                      logits_bytes=act.logits_forward_bytes, temporaries_bytes=fwd_cache, gradients_bytes=grads_all)
    # backward: each moment as (live bytes, components)
    moments = [dict(activations_bytes=act.saved_bytes, logits_bytes=act.logits_backward_bytes,
                    temporaries_bytes=bwd_cache)]
    late = st.gradients_bytes - first_gradients_bytes(card, plan)
    # a trained block's FFN weight gradients, made before its attention's backward; full: the head's, before all
    ffn_grads = block_ffn_gradients_bytes(card, plan) if trained_base else 0
    head_grads = late - (card.n_layers - 1) * block_gradients_bytes(card, plan) if plan.method == "full" else 0
    # mixed precision: a block's autocast weight copies, saved for backward (recomputed when checkpointed), live
    # until that block's backward; a weight gradient comes in the autocast dtype and is then cast to fp32 (at
    # that moment the copy it was computed with is freed: the block's copies still count once)
    top_copies, low_copies = block_cache_bytes(card, plan, lowest=False), block_cache_bytes(card, plan, lowest=True)
    ffn_copies = block_cache_bytes(card, plan, lowest=False, ffn_only=True)
    if ckpt:
        moments.append(dict(activations_bytes=inputs, temporaries_bytes=act.top_block_bytes + top_copies
                            - shared_input_bytes(card, plan) + ffn_bwd_top))
        moments.append(dict(activations_bytes=act.checkpoint_bytes * (act.frozen_below + 1), gradients_bytes=late,
                            temporaries_bytes=act.first_block_bytes + low_ckpt
                            + low_copies))
        if early_out:  # a 4-bit down projection's backward before its block is recomputed (dequant.py)
            moments += [dict(activations_bytes=inputs, temporaries_bytes=early_out),
                        dict(activations_bytes=act.checkpoint_bytes * (act.frozen_below + 1), gradients_bytes=late,
                             temporaries_bytes=early_out)]
            if act.frozen_below:
                moments.append(dict(activations_bytes=act.checkpoint_bytes * act.frozen_below,
                                    gradients_bytes=st.gradients_bytes, temporaries_bytes=early_out))
        # the frozen blocks' recomputation and backward, every gradient made; the highest frozen one runs with
        # the kept inputs of every frozen block (its own and those below)
        if act.frozen_below:
            moments.append(dict(activations_bytes=act.checkpoint_bytes * act.frozen_below,
                                gradients_bytes=st.gradients_bytes,
                                temporaries_bytes=act.frozen_block_bytes + ffn_bwd_frozen + top_copies))
        if plan.attention == "eager" or families.sdpa_math(card, plan):  # attention's backward, after the FFN's
            moments.append(dict(activations_bytes=inputs, gradients_bytes=ffn_grads,
                                temporaries_bytes=act.top_attention_bytes + top_copies - ffn_copies))
            moments.append(dict(activations_bytes=act.checkpoint_bytes * (act.frozen_below + 1),
                                gradients_bytes=late + ffn_grads,
                                temporaries_bytes=act.first_attention_bytes + max(0, low_copies - ffn_copies)
                                + attention_grads_in_flight(card, plan, ae)))
            if act.frozen_below:
                moments.append(dict(activations_bytes=act.checkpoint_bytes * act.frozen_below,
                                    gradients_bytes=st.gradients_bytes,
                                    temporaries_bytes=act.frozen_attention_bytes + top_copies - ffn_copies
                                    + frozen_attention_grads(card, plan, ae)))
    else:
        blocks_cache = bwd_cache - autocast_cache_bytes(card, plan, blocks=False)
        moments.append(dict(activations_bytes=act.saved_bytes - act.outside_bytes,
                            temporaries_bytes=ffn_bwd_top + blocks_cache))
        moments.append(dict(activations_bytes=act.first_block_bytes, gradients_bytes=late,
                            temporaries_bytes=low + low_copies))
        if plan.attention == "eager" or families.sdpa_math(card, plan):  # attention's backward, after the FFN's
            below = act.saved_bytes - act.outside_bytes - act.top_block_bytes
            moments.append(dict(activations_bytes=below + act.top_attention_bytes,
                                gradients_bytes=ffn_grads + head_grads, temporaries_bytes=blocks_cache - ffn_copies))
            moments.append(dict(activations_bytes=act.first_attention_bytes, gradients_bytes=late + ffn_grads,
                                temporaries_bytes=max(0, low_copies - ffn_copies)
                                + attention_grads_in_flight(card, plan, ae)))
    if plan.method == "top":
        # the end of backward: every gradient; mixed precision, the last one (the lowest block's first Linear)
        # still also in the autocast dtype (and, accumulating, its fp32 cast before the in-place add)
        n = layout(card).block_linears[0].weight_numel
        mixed = plan.mixed_precision
        moments.append(dict(gradients_bytes=st.gradients_bytes,
                            temporaries_bytes=(rounded(ae * n) + (rounded(FP32 * n) if accum else 0)) * mixed
                            + top_end_in_flight(card, plan, ae, act.checkpoint_bytes * (act.frozen_below == 0))))
    moments += head_gradient_moments(card, plan, act.saved_bytes, bwd_cache)
    emb = embedding_backward_bytes(card, plan)
    if plan.method == "full":  # untied too: every gradient but the embedding's, which is then written
        vd = card.vocab_size * card.d_embed * plan.bytes_per_element
        # with the gradient of the embedding's output (embedding_dense_backward's input)
        moments.append(dict(gradients_bytes=st.gradients_bytes - vd,
                            temporaries_bytes=emb + vd + stream_element_bytes(plan, card) * card.d_embed * t))
    moments += seq2seq.backward_moments(card, plan)  # an encoder-decoder's shared embedding (planning/seq2seq.py)
    if accum:
        moments = [dict(m, gradients_bytes=grads_all) for m in moments]
    bwd = _memory("backward", st, **max(moments, key=lambda m: sum(m.values())))
    opt = _memory("optimizer", st, gradients_bytes=st.gradients_bytes,
                  temporaries_bytes=max(st.optimizer_temporaries_bytes, clip_temporaries(card, plan)))
    fwd, bwd = dora.moments(card, plan, st, act, late, fwd, bwd)  # DoRA's weight-norm working set (dora.py)
    return with_scaler(plan, (fwd, bwd, opt))  # fp16 autocast: the GradScaler's scalars (scaler.py)


def head_gradient_moments(card: ModelCard, plan: Plan, saved: int, cache: int) -> list[dict[str, int]]:
    """Full fine-tuning, the first moments of backward: the output head's weight gradient is written while
    every saved tensor is alive.

    The head's MmBackward computes the input gradient (t×d), then the weight gradient (V×d, in the logits'
    dtype) from the logits' gradient (t×V, still alive as the node's input). Under autocast over weights in
    another dtype the gradient flows through the weight copy's ToCopyBackward: after the mm node released its
    saved weight copy, the gradient in the autocast dtype and its cast to the weight dtype are alive together.
    Accumulating (from the second micro-step), the new gradient is then added into `.grad` in place
    (AccumulateGrad), so it is a temporary beside every existing gradient; otherwise it becomes `.grad`.
    H = V·d_embed; shapes from layout. Source: torch/csrc/autograd/engine.cpp (saved variables released after
    a node runs), torch/csrc/autograd/functions/accumulate_grad.h.
    """
    if plan.method != "full":
        return []
    lay, t = layout(card), plan.tokens
    H = lay.head_rows * lay.head_cols
    lg, hw = DTYPES[plan.compute_dtype], plan.bytes_per_element  # the gradient's dtype, the weight's
    x_grad = lg * lay.head_cols * t  # the head input's gradient, computed first
    accum = plan.grad_accum > 1
    # the gradient as written by the mm; it becomes `.grad` itself (untied, same dtype, not accumulating)
    becomes_grad = hw == lg and not accum and not lay.head_tied
    mm = dict(activations_bytes=saved, logits_bytes=lg * t * lay.head_rows,
              temporaries_bytes=cache + x_grad + (0 if becomes_grad else rounded(lg * H)),
              gradients_bytes=rounded(lg * H) if becomes_grad else 0)
    if hw == lg:
        return [mm]
    # the weight copy (counted in the autocast cache) is freed; the cast is `.grad` unless it is added to one
    cast_is_grad = not accum and not lay.head_tied
    cast = dict(activations_bytes=saved, temporaries_bytes=cache - lg * H + x_grad + rounded(lg * H)
                + (0 if cast_is_grad else rounded(hw * H)), gradients_bytes=rounded(hw * H) if cast_is_grad else 0)
    return [mm, cast]


def clip_temporaries(card: ModelCard, plan: Plan) -> int:
    """torch.nn.utils.clip_grad_norm_ (the Trainer's max_grad_norm): one norm per gradient (`_foreach_norm`),
    their stack, the total norm and the clip coefficient; the gradients are then scaled in place. Freed
    before optimizer.step(), so the step's own temporaries are compared with these, not added."""
    if plan.max_grad_norm <= 0:
        return 0
    n, e = len(trainable_tensors(card, plan)), trainable_element_bytes(plan)
    return n * rounded(e) + rounded(n * e) + 3 * rounded(FP32)

