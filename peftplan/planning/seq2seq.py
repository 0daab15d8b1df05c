"""Encoder–decoder (T5, Flan-T5) saved tensors: the encoder stack, cross-attention, relative position bias,
T5's dropout and RMS norm, and what lies outside the blocks (`card.cross_attention`).

The card's repeated block list is the decoder's (`decoder.block`); the encoder's blocks are model-level
entries (`encoder.block.N.*`), kept whole when a card is cut (`cardgen.cut_config` cuts the decoder), so an
estimate of a cut card is the whole encoder plus k decoder blocks, as the trace builds it. Both stacks read
sequences of the same length s (the trace's decoder inputs are the labels shifted right): s stands for the
encoder and the decoder length alike.

What each module saves for backward, from transformers' models/t5/modeling_t5.py (5.x) and the trace's
kernels (`trace.run.cuda_like`: CUDA's fused dropout keeps a 1-byte mask; SDPA with a float mask keeps q, k,
v, its output, an fp32 log-sum-exp per (b, h, s) and the mask):
    T5LayerNorm       x.to(fp32).pow(2) keeps the fp32 copy (x itself in fp32), x·rsqrt keeps x and rsqrt
                      (fp32, one per token); γ·x̂ keeps x̂ (in γ's dtype when half, else fp32) when γ trains
    T5Attention       scaling 1 (no q scale), position bias (1, h, s, s) from the relative-attention
                      embedding in block 0 of each stack (the decoder's causal, the cross-attention's zeros),
                      turned into one float mask per SDPA call (`create_position_bias_mask`)
    T5DenseGatedActDense  act(wi_0(x)) · wi_1(x), dropout, (cast to wo's dtype), wo; gelu_new is
                      0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))): x, the tanh, 0.5·x and 1 + tanh are kept
    T5LayerFF / T5LayerSelfAttention / T5LayerCrossAttention  x + dropout(sublayer(norm(x)))
    T5Stack           dropout(embed), blocks, final_layer_norm, dropout
    T5ForConditionalGeneration  tied head: decoder output · d^-0.5, lm_head, CrossEntropyLoss on the logits as
                      they are (no fp32 upcast, unlike the causal-LM loss)
Pure Python: no torch.
"""
from __future__ import annotations

from dataclasses import dataclass

from peftplan.plan import Plan
from peftplan.planning.cards import ModelCard

FP32 = 4
MASK = 1  # a dropout mask element (bool)


# transformers' T5PreTrainedModel._keep_in_fp32_modules (models/t5/modeling_t5.py); a 4-bit load leaves these
# unquantized (quantizers/base.py get_modules_to_not_convert), in the load dtype (fp32 only when it is fp16)
KEEP_IN_FP32 = ("wo",)


def kept_in_fp32(card: ModelCard) -> tuple[str, ...]:
    """Last name components of the Linears a 4-bit load keeps unquantized."""
    return KEEP_IN_FP32 if applies(card) else ()


def kept_fp32_copies(card: ModelCard, plan: Plan, blocks: bool = True) -> int:
    """Elements of the autocast copies of QLoRA's unquantized wo (`KEEP_IN_FP32`), for
    memory.autocast_cache_bytes (which counts no copies under QLoRA: 4-bit weights are dequantized, not cast).
    k-bit preparation casts wo to fp32 (an fp32 load keeps it fp32), so autocast casts its weight for each call
    and autograd saves the copy when wo's input needs a gradient: encoder blocks from the lowest LoRA-wrapped one
    up, every decoder block when the encoder (cross-attention's k/v input) or the decoder's lowest block trains.
    A checkpointed block keeps none (`blocks=False`: the backward's count)."""
    wo_fp32 = plan.kbit_prep or plan.dtype == "fp32"  # k-bit preparation casts it; else it keeps the load dtype
    if not applies(card) or plan.method != "qlora" or not wo_fp32 or plan.autocast == "none" or not blocks:
        return 0
    if plan.grad_checkpointing:
        return 0
    from peftplan.planning.layout import layout
    from peftplan.planning.memory import lowest_lora_block

    lay = layout(card)
    enc = _encoder_wrapped(card, plan)
    low = next((i for i, w in enumerate(enc) if w), len(enc))
    n = sum(x.weight_numel for x in lay.other_linears if x.name.startswith("encoder.block.")
            and x.name.split(".")[-1] in KEEP_IN_FP32 and int(x.name.split(".")[2]) >= low)
    per_block = sum(x.weight_numel for x in lay.block_linears if _short(x.name).split(".")[-1] in KEEP_IN_FP32)
    dec_low = 0 if low < len(enc) else lowest_lora_block(card, plan)[0]
    return n + per_block * (card.n_layers - dec_low)


def applies(card: ModelCard) -> bool:
    """An encoder–decoder card whose blocks this module models (T5's module tree)."""
    return bool(card.cross_attention) and card.model_type in ("t5", "mt5", "umt5")


@dataclass(frozen=True)
class _Sizes:
    e: int  # activation element bytes
    d: int
    f: int
    inner: int  # h · d_kv
    h: int
    r: int
    p: float  # dropout rate
    act: str  # dense_act_fn
    gated: bool
    mask_per_token: float  # one (1, h, s, s) float mask, per token of the batch
    norm_w: int  # element bytes of the norms' weights (what γ·x̂ keeps)
    eager: bool  # T5's eager attention (else SDPA)
    s: int  # sequence length (encoder and decoder alike)
    ac: int  # the autocast dtype's bytes (0: no autocast)
    sb: int  # residual stream and norm output bytes (fp32 under mixed precision)
    la: int  # LoRA A/B element bytes (peft's fp32 by default)
    drop: bool  # LoRA dropout (lora_dropout > 0)
    qlora: bool  # peft's bnb Linear4bit: no cast to A's dtype under autocast
    clamp: bool  # an fp16 residual stream: T5Block clamps each sublayer's output
    bias_trained: bool  # the relative-attention embedding trains (full): the mask needs a gradient


def _sizes(card: ModelCard, plan: Plan) -> _Sizes:
    from peftplan.planning.memory import activation_element_bytes, stream_element_bytes
    from peftplan.plan import DTYPES

    cfg = card.config or {}
    e = activation_element_bytes(plan, card)
    h = int(cfg.get("num_heads", card.n_heads))
    inner = h * int(cfg.get("d_kv", card.head_dim))
    weights_fp32 = plan.dtype == "fp32" or (plan.method == "qlora" and plan.kbit_prep)
    act = str(cfg.get("dense_act_fn") or "relu")
    gated = bool(cfg.get("is_gated_act", str(cfg.get("feed_forward_proj", "")).startswith("gated")))
    return _Sizes(e=e, d=card.d_model, f=card.d_ff, inner=inner, h=h, r=plan.r, p=float(cfg.get("dropout_rate", 0.1)),
                  act=act, gated=gated, mask_per_token=h * plan.seq_len * e / plan.batch_size,
                  norm_w=FP32 if weights_fp32 else plan.bytes_per_element,
                  eager=plan.attention == "eager", s=plan.seq_len,
                  ac=DTYPES[plan.autocast] if plan.autocast != "none" else 0, sb=stream_element_bytes(plan, card),
                  la=DTYPES[plan.adapter_dtype], drop=bool(plan.dropout), qlora=plan.method == "qlora",
                  clamp=plan.dtype == "fp16" and stream_element_bytes(plan, card) == 2,
                  bias_trained=plan.method == "full")


def _lora_reads(z: _Sizes, x_b: int) -> tuple[float, bool]:
    """(bytes per input element one wrapped Linear's LoRA branch keeps beyond x, whether it keeps x itself).
    peft's LoRA Linear casts x to A's dtype (`_cast_input_dtype`; bnb's Linear4bit skips the cast under
    autocast), then A reads dropout(x) — autocast casts it to the autocast dtype. A keeps what it reads; a
    dropout (lora_dropout > 0) keeps its 1-byte mask (CUDA's fused dropout) and not its input, so A's input is
    a copy of its own. Without dropout and with no cast on the way, A keeps x itself (shared)."""
    conv = x_b if (z.qlora and z.ac) else z.la
    saved = z.ac or conv
    if z.drop:
        return float(saved + MASK), False
    if conv == x_b and saved == x_b:
        return 0.0, True
    return float(saved), False


@dataclass(frozen=True)
class _Trains:
    """Who trains in one block: every weight (full, top), LoRA-wrapped Linears (names as 'SelfAttention.q'),
    adapters after these Linears, the norms."""
    weights: bool
    wrapped: frozenset[str]
    adapters: frozenset[str]
    norms: bool


def _norm(z: _Sizes, grad_in: bool, trains: bool) -> float:
    """T5LayerNorm's saved bytes per token (its input x, a residual-stream tensor, is counted here: each is the
    input of exactly one norm): the fp32 copy (x itself when fp32), x, rsqrt; x̂ in γ's dtype when γ trains."""
    out = 0.0
    if grad_in:
        out += (FP32 * z.d if z.sb != FP32 else 0) + z.sb * z.d + FP32
    if trains:
        out += z.norm_w * z.d
    return out


def _group(z: _Sizes, t: _Trains, names: tuple[str, ...], d_in: int, x_b: int,
           counted: bool = False) -> tuple[float, list[bool]]:
    """(bytes per token, whether each output needs a gradient) of Linears reading one input of width d_in and
    x_b bytes per element. A trained base keeps its input (under autocast, an input not in the autocast dtype is
    cast by each Linear: one copy each). peft's LoRA casts the input to A's dtype (`_cast_input_dtype`) and
    A keeps what it reads — under autocast, the autocast-dtype cast — its own copy per wrapped Linear unless no
    cast happens (then the input itself), and A's output. `counted`: the input itself is counted elsewhere (the
    encoder output: one tensor for all decoder blocks; a fused kernel's output)."""
    shared, per = False, 0.0
    if t.weights:
        if z.ac and x_b != z.ac:
            per += len(names) * z.ac * d_in
        else:
            shared = True
    wrapped = [n in t.wrapped for n in names]
    a_reads = z.ac or z.la
    for w in wrapped:
        if not w:
            continue
        copy, keeps_x = _lora_reads(z, x_b)
        shared |= keeps_x
        per += copy * d_in + a_reads * z.r
    return per + (x_b * d_in if shared and not counted else 0.0), [t.weights or w for w in wrapped]


def _attention(z: _Sizes, t: _Trains, kind: str, grad_in: bool, kv_grad: bool, adapter_m: int) -> tuple[float, bool]:
    """One attention sublayer (kind "SelfAttention" or "EncDecAttention"), norm to residual add. kv_grad:
    the key/value input (the encoder output for cross-attention) needs a gradient; its saved copy, when a
    trained k/v keeps it, is counted once outside the blocks (one tensor for every block)."""
    total = _norm(z, grad_in, t.norms)
    g = grad_in or t.norms
    cross = kind == "EncDecAttention"
    if cross:
        q, (gq,) = _group(z, t, (f"{kind}.q",), z.d, z.sb)
        kv, (gk, gv) = _group(z, t, (f"{kind}.k", f"{kind}.v"), z.d, z.sb, counted=True)
        total += q + kv
    else:
        qkv, (gq, gk, gv) = _group(z, t, (f"{kind}.q", f"{kind}.k", f"{kind}.v"), z.d, z.sb)
        total += qkv
    need = g or gq or gk or gv or (cross and kv_grad)
    ce = z.ac or z.e  # autocast casts the attention's inputs (q, k, v and the mask) to its dtype
    if need and z.eager:  # T5's eager_attention_forward: matmuls on contiguous copies of q, kᵀ and v, the
        # softmax's output, attention dropout's output and mask (b·h·s² each); o reads a contiguous copy
        # (under autocast softmax is an fp32-list op: it keeps fp32 probabilities, and the matmul with v keeps
        # its autocast-dtype copy of dropout's output)
        probs = FP32 + z.ac if z.ac else 2 * ce
        total += 3 * ce * z.inner + probs * z.h * z.s + (MASK * z.h * z.s if z.p > 0 else 0)
    elif need:  # SDPA: q, k, v, output, fp32 log-sum-exp, the float mask
        # (a mask that needs a gradient goes to the memory-efficient kernel as it is, in the bias embedding's
        # dtype — trace.run.cuda_like; otherwise autocast casts it)
        mask_b = (z.norm_w if z.norm_w == FP32 else z.e) if z.bias_trained else ce
        total += 4 * ce * z.inner + FP32 * z.h + z.mask_per_token * mask_b / z.e
    # the fused kernels (CPU flash, CUDA memory-efficient) lay their output out as (b, s, h, d_kv): the
    # transpose(1, 2).contiguous() before o is a view, so o's kept input is the kernel's saved output
    o, (go,) = _group(z, t, (f"{kind}.o",), z.inner, ce, counted=need and not z.eager)
    total += o
    a = need or go
    if f"{kind}.o" in t.adapters:  # Houlsby adapter on o's output: its input, down's output, activation
        total += z.e * z.d + 2 * z.e * adapter_m
        a = True
    if a and z.p > 0:
        total += MASK * z.d
    return total, g or a


def _act_saved(z: _Sizes) -> int:
    """Tensors of width f the activation keeps (transformers' activations.py)."""
    return {"gelu_new": 4, "gelu_fast": 4, "gelu_pytorch_tanh": 1, "gelu": 1, "relu": 1, "silu": 1}.get(z.act, 1)


def _ffn(z: _Sizes, t: _Trains, grad_in: bool, adapter_m: int) -> tuple[float, bool]:
    """T5LayerFF: norm, wi_0 / wi_1 (or wi), activation, product, dropout, wo, dropout, residual add. Under
    autocast gelu_new's pow runs in fp32 (CUDA's fp32 list): it keeps an fp32 copy of x, and tanh, 1 + tanh
    and the activation's output are fp32 (0.5·x stays in the autocast dtype); wo reads the fp32 product."""
    total = _norm(z, grad_in, t.norms)
    g = grad_in or t.norms
    gelu_new = z.act in ("gelu_new", "gelu_fast")
    wi_out = z.sb if z.qlora else z.e  # bnb's Linear4bit returns its output in its input's dtype
    act_out = FP32 if (z.ac and gelu_new) else wi_out
    if z.gated:
        a, (g0, g1) = _group(z, t, ("DenseReluDense.wi_0", "DenseReluDense.wi_1"), z.d, z.sb)
        g0, g1 = g0 or g, g1 or g
        total += a
        if gelu_new:  # x (its fp32 copy under autocast), tanh, 0.5·x, 1 + tanh
            total += (3 * act_out + wi_out) * z.f * g0
        else:
            total += wi_out * z.f * g0
        total += wi_out * z.f * g0 + act_out * z.f * g1  # the product keeps wi_1's output and the activation's
        inner_grad = g0 or g1
    else:
        a, (g0,) = _group(z, t, ("DenseReluDense.wi",), z.d, z.sb)
        total += a
        inner_grad = g0 or g
        total += ((3 * act_out + wi_out) if gelu_new else wi_out) * z.f * inner_grad
    if inner_grad and z.p > 0:
        total += MASK * z.f
    wo, (gwo,) = _group(z, t, ("DenseReluDense.wo",), z.f, max(act_out, wi_out))
    total += wo
    out = inner_grad or gwo
    if "DenseReluDense.wo" in t.adapters:
        total += z.e * z.d + 2 * z.e * adapter_m
        out = True
    if out and z.p > 0:
        total += MASK * z.d
    return total, g or out


def _block(z: _Sizes, t: _Trains, grad_in: bool, decoder: bool, enc_grad: bool, adapter_m: int) -> float:
    """T5Block: its sublayers; on an fp16 stream each sublayer's output goes through torch.clamp(x, min, max)
    with tensor bounds ("clamp inf values to enable fp16 training"), whose backward keeps its input."""
    total, g = _attention(z, t, "SelfAttention", grad_in, False, adapter_m)
    total += z.e * z.d * (z.clamp and g)
    if decoder:
        x, g = _attention(z, t, "EncDecAttention", g, enc_grad, adapter_m)
        total += x + z.e * z.d * (z.clamp and g)
    x, g = _ffn(z, t, g, adapter_m)
    return total + x + z.e * z.d * (z.clamp and g)


def _short(name: str) -> str:
    """'layer.1.EncDecAttention.q' / 'encoder.block.3.layer.1.DenseReluDense.wo' -> 'EncDecAttention.q' / ..."""
    return ".".join(name.split(".")[-2:])


def _trains(card: ModelCard, plan: Plan, trainable_block: bool, wrapped) -> _Trains:
    adapters = frozenset()
    if plan.method == "adapter":
        from peftplan.planning.layout import layout

        roles = {"attn_out", "ffn_out"} if plan.adapter_placement == "houlsby" else {"ffn_out"}
        adapters = frozenset(_short(x.name) for x in layout(card).block_linears if x.role in roles)
    return _Trains(weights=trainable_block, wrapped=frozenset(_short(n) for n in (wrapped or ())),
                   adapters=adapters, norms=trainable_block or plan.method == "adapter")


def _wrapped_all(card: ModelCard, plan: Plan) -> frozenset[str]:
    from peftplan.planning.params import lora_targets

    if not plan.uses_lora:
        return frozenset()
    return frozenset(_short(lin.name) for lin, _, _ in lora_targets(card, plan.targets))


def _encoder_wrapped(card: ModelCard, plan: Plan) -> list[frozenset[str]]:
    """Per encoder block, the Linears LoRA wraps (short names)."""
    from peftplan.planning.params import lora_targets

    out = [set() for _ in range(encoder_layers(card))]
    if plan.uses_lora:
        for lin, in_block, _ in lora_targets(card, plan.targets):
            if not in_block and lin.name.startswith("encoder.block."):
                out[int(lin.name.split(".")[2])].add(_short(lin.name))
    return [frozenset(s) for s in out]


def encoder_layers(card: ModelCard) -> int:
    return int((card.config or {}).get("num_layers", card.n_layers))


def encoder_trains(card: ModelCard, plan: Plan) -> bool:
    """Whether anything in (or under) the encoder's output needs a gradient."""
    if plan.method in ("full", "adapter"):
        return True
    if plan.method == "top":  # frozen encoder; checkpointed, enable_input_require_grads reaches it
        return plan.grad_checkpointing
    return any(_encoder_wrapped(card, plan)) or plan.grad_checkpointing


def block_saved_per_token(card: ModelCard, plan: Plan, trainable_block: bool, first: bool,
                          wrapped: frozenset[str] | None) -> float:
    """Bytes per token one decoder block saves (memory.block_saved_per_token's arguments: `first` — the
    block's input needs no gradient; `wrapped` — the block's LoRA-wrapped Linears, None: every target)."""
    z = _sizes(card, plan)
    if wrapped is None:
        wrapped = _wrapped_all(card, plan) if plan.uses_lora else frozenset()
    t = _trains(card, plan, trainable_block, wrapped)
    grad_in = not first or trainable_block
    return _block(z, t, grad_in, True, encoder_trains(card, plan), plan.adapter_size)


def encoder_saved_per_token(card: ModelCard, plan: Plan) -> float:
    """Bytes per token the whole encoder stack saves: its blocks, the embedding's dropout mask, the final norm
    and dropout, and the encoder output itself when a trained cross-attention k/v keeps it."""
    z = _sizes(card, plan)
    full = plan.method == "full"
    if not encoder_trains(card, plan):
        return 0.0
    ckpt = plan.grad_checkpointing
    total = 0.0
    grad = full or ckpt  # the embedding output needs a gradient (trained, or enable_input_require_grads)
    if grad and z.p > 0:
        total += MASK * z.d
    for wrapped in _encoder_wrapped(card, plan) if plan.uses_lora else [frozenset()] * encoder_layers(card):
        t = _trains(card, plan, full, wrapped)
        t = _Trains(t.weights, t.wrapped, frozenset(), t.norms)  # the trace's adapters sit in the decoder only
        if ckpt:
            total += z.sb * z.d  # a checkpointed block keeps its input
        else:
            total += _block(z, t, grad, False, False, plan.adapter_size)
        grad = True if (grad or t.weights or t.wrapped or t.norms) else False
    norms = full or plan.method == "adapter"
    total += _norm(z, grad, norms)
    if z.p > 0:
        total += MASK * z.d
    if encoder_kv_kept(card, plan):
        total += z.sb * z.d  # the encoder output, kept by every decoder block's trained (or fp32 LoRA's) k and v
    return total


def outside_saved_per_token(card: ModelCard, plan: Plan) -> float:
    """Bytes per token saved outside the decoder blocks: the encoder stack, the decoder's embedding dropout,
    final norm and dropout, the scaled head input (tied head: d^-0.5) when the head trains, the relative
    position buckets (int64, s×s, one per stack) when the bias embedding trains."""
    z = _sizes(card, plan)
    full = plan.method == "full"
    total = encoder_saved_per_token(card, plan)
    if (full or plan.grad_checkpointing) and z.p > 0:
        total += MASK * z.d  # decoder embedding dropout
    total += _norm(z, True, full or plan.method == "adapter")
    if z.p > 0:
        total += MASK * z.d
    if full:
        total += z.e * z.d  # lm_head's input (the scaled output of a tied head; the dropout output otherwise)
        total += 2 * 8 * plan.seq_len / plan.batch_size  # relative position buckets of both stacks
    return total + checkpointed_extra_per_token(card, plan)


def checkpointed_extra_per_token(card: ModelCard, plan: Plan) -> float:
    """Checkpointed (non-reentrant), alive from forward until backward, beyond each block's kept input:
    both stacks' embedding outputs (made leaves requiring grad by `enable_input_require_grads`, hooked on each
    stack's embed_tokens, so the graph holds them), the encoder output (an argument of every checkpointed decoder
    block; counted already when trained k/v keep it), each stack's relative position bias (s, s, h, in the
    embedding's weight dtype: made in block 0, an argument of blocks 1.. — a stack of one block drops it), and
    the cross-attention's zero bias (1, h, s, s), which T5Attention makes a leaf requiring grad under
    checkpointing (the graph holds it)."""
    if not applies(card) or not plan.grad_checkpointing:
        return 0.0
    z = _sizes(card, plan)
    full = plan.method == "full"
    bias = z.norm_w if z.norm_w == FP32 else plan.bytes_per_element  # the bias embedding's dtype
    out = 2 * z.sb * z.d + (0 if full or encoder_kv_kept(card, plan) else z.sb * z.d)
    stacks = (encoder_layers(card) > 1) + (card.n_layers > 1)  # blocks 1.. of a stack take its bias as argument
    return out + stacks * z.h * plan.seq_len * bias / plan.batch_size + z.mask_per_token


def encoder_kv_kept(card: ModelCard, plan: Plan) -> bool:
    """Whether the decoder's k/v keep the encoder output for backward (trained, or fp32 LoRA on them)."""
    z = _sizes(card, plan)
    kv = {"EncDecAttention.k", "EncDecAttention.v"}
    if plan.method == "full":
        return not z.ac or z.sb == z.ac
    return bool(kv & _wrapped_all(card, plan)) and _lora_reads(z, z.sb)[1]


def backward_moments(card: ModelCard, plan: Plan) -> list[dict[str, int]]:
    """Backward moments of an encoder–decoder beyond the decoder-only ones (memory.phases), as Memory fields.

    Full fine-tuning with a tied head: the shared embedding is read three times (encoder input, decoder input,
    lm_head), so autograd sums its gradients in the engine's input buffer and accumulates them once, at the very
    end. When the decoder's backward is done, its embedding's gradient is added to the head's: the head's
    weight gradient, the embedding's and their sum (V×d each) live beside the encoder's saved tensors (its
    backward has not begun) — under mixed precision with them its Linears' autocast weight copies, saved for
    their backward (not checkpointed: a checkpointed encoder recomputes them later) — the decoder's gradients
    and the gradient of the encoder output."""
    if not applies(card) or plan.method != "full" or not card.tie_embeddings:
        return []
    from peftplan.planning.memory import block_gradients_bytes, rounded, stream_element_bytes

    w = plan.bytes_per_element
    cfg = card.config or {}
    z = _sizes(card, plan)
    vd = rounded(card.vocab_size * card.d_model * w)
    grads = (card.n_layers * block_gradients_bytes(card, plan) + rounded(card.d_model * w)
             + rounded(int(cfg.get("relative_attention_num_buckets", 32)) * z.h * w))
    t = plan.tokens
    acts = int(encoder_saved_per_token(card, plan) * t)
    copies = 0
    if plan.autocast != "none" and plan.mixed_precision and not plan.grad_checkpointing:
        from peftplan.planning.layout import layout
        from peftplan.plan import DTYPES

        copies = DTYPES[plan.autocast] * sum(x.weight_numel for x in layout(card).other_linears
                                             if x.name.startswith("encoder.block."))
    return [dict(activations_bytes=acts, gradients_bytes=grads,
                 temporaries_bytes=3 * vd + stream_element_bytes(plan, card) * card.d_model * t + copies)]


def unsaved_encoder_copies(card: ModelCard, plan: Plan, blocks: bool = True) -> int:
    """Elements of the encoder's Linear weights (model-level Linears to memory.autocast_cache_bytes, which
    counts each one's autocast copy) whose copy is not alive: the encoder is frozen and needs no gradient
    (top-k); checkpointed, its blocks keep no copies (a trained weight's cached copy lives through forward only:
    `blocks=False` is the backward's count); a frozen LoRA base's encoder block 0 reads a block input that needs
    no gradient, so q, k and v keep no copy (and its lowest decoder block's cross-attention, not among the
    roles memory.py reads, keeps its four: counted here, negative)."""
    if not applies(card) or not plan.mixed_precision or plan.method == "qlora":
        return 0
    from peftplan.planning.layout import layout

    enc = [x for x in layout(card).other_linears if x.name.startswith("encoder.block.")]
    if plan.method == "top" or (plan.grad_checkpointing and not (plan.method == "full" and blocks)):
        return sum(x.weight_numel for x in enc)
    if plan.uses_lora:
        first = ("encoder.block.0.layer.0.SelfAttention.q", "encoder.block.0.layer.0.SelfAttention.k",
                 "encoder.block.0.layer.0.SelfAttention.v")
        # memory.autocast_cache_bytes counts the lowest decoder block's Linears by the decoder-only roles; its
        # cross-attention's q, k, v and o read inputs that need a gradient, and keep their copies too
        cross = sum(x.weight_numel for x in layout(card).block_linears if x.role.startswith("cross_attn"))
        return sum(x.weight_numel for x in enc if x.name in first) - cross
    return 0
