"""Per-block memory terms of what the newer families do beyond the classic pre-norm block.

Each term reads an explicit card fact that cardgen recorded (the `qk_norm` flag and the norms' sizes in the
module tree, the Linears' roles and shapes, the config.json kept in the card) and returns bytes per token that `memory._block_saved_per_token`
adds to its generic count with one call line. Symbols as in memory.py: d hidden, q = h·d_h query width,
k = h_kv·d_h key/value width, e bytes per element.

    qk_norm_correction   q/k norms (Qwen3, OLMo-2, Gemma-3): the generic count treats every block norm as a
                         d-wide norm of the residual stream; a q/k norm normalises q (q elements) and k (k
                         elements) in groups of its own size (d_h per head in Qwen3/Gemma-3, the whole
                         projection in OLMo-2), saving a fp32 copy of its input and one fp32 rsqrt per group.
    fp32_scaled_norms    RMSNorms that multiply by γ in fp32 and cast after (Gemma's (1 + γ), OLMo-2's γ), so a
                         training γ keeps x̂ in fp32, not in the compute dtype as Llama's RMSNorm does
                         (transformers' Gemma3RMSNorm.forward, Olmo2RMSNorm.forward).
    fused_qkv_correction one fused q/k/v projection (GPT-NeoX/Pythia, Phi-3/Phi-4, Falcon, BLOOM): q, k and v
                         are views of its output; rotary makes new q and k, and SDPA saves v, so the whole
                         q + 2k wide output stays alive where separate projections keep v alone: (q + k)·e
                         more per token. Without rotary (GPT-2) q and k stay views too: nothing more. (A
                         fused gate_up costs nothing extra: gate and up are both saved anyway.) QLoRA under
                         autocast on a LayerNorm family: the fused output is fp32 and SDPA saves bf16/fp16
                         copies of q, k and v: nothing more either.
    parallel_norm_correction  parallel blocks (GPT-NeoX/Pythia: x + attn(ln1(x)) + mlp(ln2(x))): both pre-norms
                         read the block input x, which a LayerNorm saves, so x is saved once, not twice.
    rotary_cat_correction  Phi-3/Phi-4 and GPT-NeoX build the rotated q by concatenating the rotated and the
                         pass-through part of each head (their apply_rotary_pos_emb always does), so q is a new
                         contiguous (b, h, s, d_h) tensor, SDPA's output has that layout too, and transformers'
                         `transpose(1, 2).contiguous()` copies it: when the output projection saves its input
                         (QLoRA's fp32 stream, a trained o_proj), that copy is saved beside SDPA's own output,
                         q·ce more per token (the eager path counts it already).
    sdpa_math_correction multi-query attention that calls SDPA with fewer key/value heads than query heads and
                         no `enable_gqa` (Falcon's own attention code): neither flash nor memory-efficient
                         kernels take that, so SDPA runs its math path, which upcasts to fp32 and saves the
                         scaled q, k and v (views of the one kv head for b = 1, copies broadcast to h heads
                         by the batched matmul for b > 1) and the b·h·s² probabilities: 4·(q + 2k) + 4·h·s
                         per token (k = q for b > 1), in place of the flash kernel's q, k, v, output and lse
                         (torch aten/native/transformers/attention.cpp, _scaled_dot_product_attention_math).
    falcon_eager_correction  Falcon's own eager path: scores = q @ kᵀ with the one kv head broadcast by matmul
                         (views for b = 1, copies for b > 1), softmax in the hidden states' dtype, probs @ v:
                         q·ce + 2·kv·ce + ce·h·s per token where the generic eager count has q, k and v at h heads
                         and a fp32 softmax with its cast. Without autocast only (under autocast the generic
                         count stands).
    sliding-window       layers attending to the last W tokens (Gemma-2/3's "sliding_attention" layer_types,
                         Mistral's sliding_window): once s > W, transformers hands SDPA an explicit b×1×s×s
                         bool mask (built once, 1 byte per element), which SDPA turns into an additive mask in
                         the compute dtype and saves, in every sliding layer: ce·s per token per such layer.
                         Full-attention layers keep `is_causal` and no mask.
    logit_softcap        the final logits soft-capped, cap·tanh(z / cap) (Gemma-2): tanh's output is saved.
    mla_correction       multi-head latent attention (DeepSeek-V2, role attn_latent): q and k are h·(nope + rope)
                         wide, v a view of kv_b_proj's h·(nope + v) output, SDPA's output h·v, under CUDA's
                         memory-efficient kernel; the latent norms are kv_lora_rank (q_lora_rank) wide.
    sink_eager_correction  eager attention with sinks (gpt-oss): a bf16 softmax over s + 1 columns and the row
                         max's int64 indices, in place of the fp32 softmax and its cast.
    eager_fp32_qk_correction  GPT-J's (and CodeGen's) eager attention: q @ kᵀ on fp32 copies of q and k, saved
                         in place of the compute-dtype ones. BLOOM's ALiBi (a (b·h, 1, s) bias, baddbmm into the
                         scores, fp32 softmax cast back) is the generic eager count; its class is eager only.

    encoder_block_correction, outside_correction  ModernBERT (transformers' models/modernbert), an encoder of
                         bias-free LayerNorms (the card's norm "layernorm", its tree norms without bias) in
                         pre-norm blocks, no attention norm in block 0, the final norm; its GLU split from one Wi
                         output is the card's gated MLP (chunked_glu); its MLM loss upcasts the logits
                         (mlm_loss_upcasts); local layers' bidirectional window W = local_attention // 2.
    deberta_correction   DeBERTa-v2's eager disentangled attention (transformers' DisentangledSelfAttention).

Three class traits no config field states are named by family until cardgen records them (the shipped generated
cards would need re-importing): FP32_SCALE_FAMILIES, ROTARY_CAT_FAMILIES, SDPA_NO_GQA_FAMILIES.

Sources: transformers 5.24 models/qwen3 (Qwen3RMSNorm on q_proj/k_proj outputs viewed as (b, s, h, d_h)),
models/olmo2 (q_norm over h·d_h before the head split), models/gemma3 (Gemma3RMSNorm, q_norm/k_norm per head);
PyTorch's autograd save rules (pow and mul save their inputs, rsqrt its output).
"""
from __future__ import annotations

import re

from peftplan.plan import Plan
from peftplan.planning.cards import ModelCard
from peftplan.planning.layout import Norm, layout

FP32 = 4
_QK = re.compile(r"(^|\.)(q|k)_(norm|layernorm)$")


def qk_norms(card: ModelCard) -> tuple[Norm, ...]:
    """The block's query and key norms (empty unless the card's `qk_norm` fact is set)."""
    if not card.qk_norm:
        return ()
    return tuple(n for n in layout(card).block_norms if _QK.search(n.name))


# The RMSNorm classes that scale in fp32 before casting back. Not yet a card field: the shipped generated cards
# would have to be re-imported to carry it; until then the family names the class.
FP32_SCALE_FAMILIES = ("gemma", "gemma2", "gemma3", "olmo2")


def fp32_scaled_norms(card: ModelCard) -> bool:
    """RMSNorm whose γ scale is computed in fp32 and cast after (Gemma's 1 + γ, OLMo-2)."""
    return card.norm == "rmsnorm" and card.family in FP32_SCALE_FAMILIES


def _rms_saved(width: int, groups: int, plan: Plan, e: int, scale_fp32: bool, weight_trains: bool) -> int:
    """An RMSNorm over `width` elements per token in `groups` groups: fp32 x, fp32 rsqrt per group, and the
    normalised x̂ (fp32 or e) when γ trains."""
    return FP32 * width + FP32 * groups + ((FP32 if scale_fp32 else e) * width if weight_trains else 0)


def qk_norm_correction(card: ModelCard, plan: Plan, e: int, generic_norm: float, weight_trains: bool,
                       qk_grad: tuple[bool, bool] = (True, True)) -> float:
    """Bytes per token to add to a block's count for its q/k norms: what they save minus `generic_norm`, the
    bytes per token the generic count gave each of them (memory.py counts only the block's d-wide norms: 0).
    qk_grad: whether the query's / key's norm input needs a gradient (not in the lowest block of a frozen base
    whose q/k projections are not wrapped)."""
    norms = qk_norms(card)
    if not norms:
        return 0.0
    total = 0.0
    for n in norms:
        is_q = n.name.rsplit(".", 1)[-1].startswith("q")
        if not qk_grad[0 if is_q else 1]:
            continue
        width = card.d_q if is_q else card.d_kv
        total += _rms_saved(width, max(1, width // n.size), plan, e, fp32_scaled_norms(card), weight_trains)
    return total - len(norms) * generic_norm


def fp32_scale_correction(card: ModelCard, e: int, weight_trains: bool) -> float:
    """Bytes per token to add for the fp32 x̂ of fp32-scaled d-wide block norms when γ trains (the generic
    count keeps x̂ in the compute dtype)."""
    if not (weight_trains and fp32_scaled_norms(card)) or card.family == "gemma2":  # gemma2: memory.norm_saved
        return 0.0
    wide = len(layout(card).block_norms) - len(qk_norms(card))
    return wide * (FP32 - e) * card.d_model


def fused_qkv(card: ModelCard) -> bool:
    """The block's attention reads one fused q/k/v Linear (role attn_in, q + 2k wide): a fact of the tree."""
    attn_in = [x for x in layout(card).block_linears if x.role == "attn_in"]
    return len(attn_in) == 1 and attn_in[0].d_out == card.d_q + 2 * card.d_kv


def fused_qkv_correction(card: ModelCard, plan: Plan, ce: int) -> float:
    """Bytes per token SDPA keeps beyond separate projections when v is a view of the fused qkv output."""
    if plan.attention not in ("sdpa", "flash") or not fused_qkv(card) or card.positions != "rotary" \
            or sdpa_math(card, plan) or _memory_models_phi3_rope(card):
        return 0.0  # without rotary (GPT-2) q and k stay views of the same output too: nothing extra
    if plan.method == "qlora" and plan.autocast != "none" and card.norm == "layernorm":
        # autocast runs layer_norm in fp32 and a Linear4bit returns its input's dtype: the fused output is fp32,
        # so SDPA's autocast casts q, k and v to copies (saved as q, k, v) and v is no view of it
        return 0.0
    return ce * (card.d_q + card.d_kv)


def _text_config(card: ModelCard) -> dict:
    text = card.config.get("text_config")
    return text if isinstance(text, dict) else card.config  # multimodal configs keep the text model's facts here


def sliding_window(card: ModelCard) -> int:
    """The sliding window W in tokens (0: none), from the generated card's config.json."""
    cfg = _text_config(card)
    if card.model_type == "modernbert":  # ModernBertConfig.sliding_window: local_attention // 2 (a half-window)
        return int(cfg.get("local_attention", 128)) // 2
    if cfg.get("use_sliding_window") is False:
        return 0
    return int(cfg.get("sliding_window") or 0)


def sliding_layers(card: ModelCard) -> int:
    """How many of the card's first n_layers blocks use the sliding window (config `layer_types`; every layer
    when the config has a window and no per-layer list)."""
    if not sliding_window(card):
        return 0
    cfg = _text_config(card)
    types = cfg.get("layer_types")
    if card.model_type == "modernbert" and not isinstance(types, list):
        every = int(cfg.get("global_attn_every_n_layers", 3))  # as ModernBertConfig.__post_init__
        return sum(bool(i % every) for i in range(card.n_layers))
    if isinstance(types, list):
        return sum(t == "sliding_attention" for t in types[:card.n_layers])
    pattern = cfg.get("sliding_window_pattern")
    if isinstance(pattern, int) and pattern > 0:  # Gemma-3's config.json: every pattern-th layer is global
        return sum(bool((i + 1) % pattern) for i in range(card.n_layers))  # as Gemma3TextConfig.__post_init__
    return card.n_layers


def sliding_mask_applies(card: ModelCard, plan: Plan) -> bool:
    w = sliding_window(card)
    if card.model_type == "modernbert":
        # create_bidirectional_sliding_window_mask skips the mask only while s < W
        # (masking_utils._ignore_bidirectional_mask_sdpa)
        return plan.attention == "sdpa" and 0 < w <= plan.seq_len and sliding_layers(card) > 0
    return plan.attention == "sdpa" and 0 < w < plan.seq_len and sliding_layers(card) > 0


def sliding_block_bytes(card: ModelCard, plan: Plan, ce: int) -> float:
    """Bytes per token per block (averaged over the blocks) of the additive masks SDPA saves in sliding layers."""
    if not sliding_mask_applies(card, plan):
        return 0.0
    return ce * plan.seq_len * sliding_layers(card) / card.n_layers


def mask_saved_per_token(card: ModelCard, plan: Plan) -> float:
    """The one bool b×1×s×s sliding-window mask the model builds for its sliding layers, bytes per token."""
    return float(plan.seq_len) if sliding_mask_applies(card, plan) else 0.0


def ffn_input_grad(card: ModelCard, block_in: bool, attn: bool) -> bool:
    """Whether the FFN's input needs a gradient: in a sequential block it is the residual after attention
    (`attn`); in a parallel block (GPT-NeoX/Pythia, Falcon: x + attn(ln1(x)) + mlp(ln2(x))) the norm of the
    block's input, which needs none in the lowest block of a frozen base (`block_in`), whatever LoRA wraps in
    the attention (transformers models/gpt_neox GPTNeoXLayer.forward, models/falcon FalconDecoderLayer.forward)."""
    return block_in if card.parallel_block else attn


# Classes whose block Linears multiply by `self.weight.T` (transformers models/falcon FalconLinear.forward): the
# autocast cast is of a view, not of the leaf weight, so torch's cast cache never keeps it (cached_cast caches
# only fp32 leaves, no views); a copy lives only while autograd saves it. A trait of the class, named by family.
UNCACHED_LINEAR_FAMILIES = ("falcon",)


def block_casts_uncached(card: ModelCard) -> bool:
    """Whether the blocks' autocast weight copies are never cached (checkpointed: none alive through forward)."""
    return card.family in UNCACHED_LINEAR_FAMILIES


def one_norm_output(card: ModelCard, both_saved: bool) -> bool:
    """A parallel block with one norm (Falcon-7B: `input_layernorm` only, no `new_decoder_architecture`): the
    attention's and the MLP's input Linears read the same LayerNorm output, so when both groups keep it
    (`both_saved`: memory.py counted it for each) it is one tensor (transformers models/falcon
    FalconDecoderLayer.forward: `attention_layernorm_out` is the MLP's input too)."""
    wide = len(layout(card).block_norms) - len(qk_norms(card))
    return both_saved and card.parallel_block and wide == 1


def parallel_norm_correction(card: ModelCard, e: int, norm_input_saved: bool) -> float:
    """Bytes per token the generic count gave twice for a parallel block's two pre-norms' shared input."""
    wide = len(layout(card).block_norms) - len(qk_norms(card))
    if not (card.parallel_block and wide == 2 and card.norm == "layernorm" and norm_input_saved):
        return 0.0
    return -e * card.d_model


# Classes whose apply_rotary_pos_emb concatenates (rotated, pass-through) even for a full rotary: a class trait
# that no config field states (Phi-4's config has no partial_rotary_factor), so the family names it.
ROTARY_CAT_FAMILIES = ("phi3", "gpt_neox")


def _memory_models_phi3_rope(card: ModelCard) -> bool:
    """Whether memory.py itself already counts Phi-3's fused-qkv storage and output copy (helper 17's branch
    adds `memory._rope_by_cat` for model_type phi3): then the two terms below stay out for those cards, so a
    merge of both branches cannot count them twice."""
    from peftplan.planning import (
        memory,  # memory imports this module: imported here, at call time
    )

    by_cat = getattr(memory, "_rope_by_cat", None)
    return bool(by_cat and by_cat(card))


def rotary_cat_correction(card: ModelCard, plan: Plan, ce: int, out_proj_saves_input: bool) -> float:
    if plan.attention not in ("sdpa", "flash") or card.family not in ROTARY_CAT_FAMILIES or not out_proj_saves_input \
            or _memory_models_phi3_rope(card):
        return 0.0
    return ce * card.d_q


# Families whose attention hands SDPA un-repeated kv heads without enable_gqa (transformers' models/falcon).
SDPA_NO_GQA_FAMILIES = ("falcon",)


def sdpa_math(card: ModelCard, plan: Plan) -> bool:
    return (plan.attention in ("sdpa", "flash") and card.family in SDPA_NO_GQA_FAMILIES
            and card.n_kv_heads < card.n_heads)


def sdpa_math_correction(card: ModelCard, plan: Plan, ce: int, out_proj_saves_input: bool = False,
                         qk_grad: tuple[bool, bool] = (True, True)) -> float:
    """Bytes per token the math path saves minus what the generic count gave the flash kernel. The math path's
    output is (b, h, s, d_h), so Falcon's permute + reshape to (b, s, h·d_h) copies it: when the output
    projection saves its input (full fine-tuning), that copy is saved, ce·q. Neither q nor k needing a gradient
    (the lowest block of a frozen base, q/k/v not wrapped) the matmuls save nothing and the generic count gave
    only the output projection's input: 0."""
    if not sdpa_math(card, plan) or not (qk_grad[0] or qk_grad[1]):
        return 0.0
    q, k, h = card.d_q, card.d_kv, card.n_heads
    # k and v broadcast to h heads stay views for b = 1; for b > 1 the batched matmul materialises them
    kv = q if plan.batch_size > 1 else k
    math_saved = FP32 * (q + 2 * kv) + FP32 * h * plan.seq_len + ce * q * out_proj_saves_input
    flash_saved = ce * (2 * q + 2 * k) + FP32 * h
    return math_saved - flash_saved


def sdpa_math_attention(card: ModelCard, plan: Plan, ce: int, before_attention: float, e: int) -> float:
    """Bytes per token of one block at its attention's backward on SDPA's math path (memory.py's part="attention"
    moment, as for eager attention): what the block saved before attention (`before_attention`, which holds this
    module's sdpa_math_correction: taken out), the fp32 scaled q and k that q·kᵀ saved (k broadcast to h heads
    for b > 1), and three fp32 b·h·s² tensors: the saved probabilities, their gradient (grad_out·vᵀ) and the
    softmax's input gradient (torch aten/native/transformers/attention.cpp, _scaled_dot_product_attention_math:
    matmul, softmax, matmul as separate autograd nodes; measured on Falcon-7B); beside them the gradient entering
    the block (e per element of d) and the attention output's (ce)."""
    q, kv = card.d_q, card.d_q if plan.batch_size > 1 else card.d_kv
    return (before_attention - sdpa_math_correction(card, plan, ce) + FP32 * (q + kv)
            + 3 * FP32 * card.n_heads * plan.seq_len + (e + ce) * card.d_model)


def falcon_eager_correction(card: ModelCard, plan: Plan, ce: int) -> float:
    """Bytes per token Falcon's eager attention saves minus the generic eager count (memory.py: q, k and v at h
    heads, fp32 softmax output and its cast back to ce, no dropout)."""
    if (plan.attention != "eager" or card.family not in SDPA_NO_GQA_FAMILIES or card.n_kv_heads >= card.n_heads
            or plan.autocast != "none" or card.attention_dropout > 0):
        return 0.0
    q, k, h, s = card.d_q, card.d_kv, card.n_heads, plan.seq_len
    kv = q if plan.batch_size > 1 else k
    generic = 3 * ce * q + (FP32 + (ce if ce != FP32 else 0)) * h * s
    return ce * (q + 2 * kv) + ce * h * s - generic


def mla_dims(card: ModelCard) -> tuple[int, int, int, int] | None:
    """Multi-head latent attention's head dims from the card's config.json (DeepSeek-V2/V3): (qk_nope, qk_rope,
    v, kv_lora_rank) per head; None for a card without an attn_latent Linear (the module tree's fact)."""
    if not any(lin.role == "attn_latent" for lin in layout(card).block_linears):
        return None
    cfg = _text_config(card)
    keys = ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank")
    if not all(isinstance(cfg.get(k), int) and cfg[k] > 0 for k in keys):
        return None  # not the DeepSeek-V2 config layout: the estimate warns (warnings)
    return tuple(int(cfg[k]) for k in keys)


def mla_correction(card: ModelCard, plan: Plan, e: int, ce: int, generic_norm: float, weight_trains: bool,
                   wrapped_roles: frozenset[str]) -> float:
    """Bytes per token multi-head latent attention saves minus the generic count (SDPA of q, k, v and output at
    d_q / d_kv wide, every block norm d-wide, no latent Linear).

    transformers 5.24 models/deepseek_v2 (DeepseekV2Attention.forward, expand_kv): q = cat(q_nope, rotated q_pe)
    and k = a new (b, h, s, nope + rope) tensor are h·(nope + rope) wide each; v is a view of kv_b_proj's
    h·(nope + v) wide output, so SDPA keeps that whole output; its output is h·v wide. A value head dim unlike
    the query's makes CUDA run the memory-efficient kernel (flash refuses it), which saves q, k, v, the output and
    a fp32 logsumexp per head (the trace runs that kernel, peftplan/trace/run.py). The rotary on the split rope
    dims multiplies by the no-grad cos/sin table only: nothing per block. The latent norms (kv_a_layernorm over
    kv_lora_rank, q_a_layernorm over q_lora_rank) save a fp32 copy and one rsqrt (x̂ when γ trains) where the
    generic count gave a d-wide norm; kv_b_proj keeps its input (the normed latent) when it trains or LoRA wraps
    it. The output projection reads h·v, not the generic d_q: a LoRA-wrapped o_proj whose adapter dtype differs
    from the activations' saves its cast copy of that width (memory._block_saved_per_token's group rule). Eager
    attention is not modelled (memory.estimate warns)."""
    dims = mla_dims(card)
    if dims is None or plan.attention not in ("sdpa", "flash"):
        return 0.0
    nope, rope, v, rank = dims
    h = card.n_heads
    mla = ce * h * (2 * (nope + rope) + (nope + v) + v)
    generic = ce * (2 * card.d_q + 2 * card.d_kv)
    latent_norms = [n for n in layout(card).block_norms if n.size != card.d_model]
    norms = sum(_rms_saved(n.size, 1, plan, e, False, weight_trains) - generic_norm for n in latent_norms)
    latent_wrapped = "attn_latent" in wrapped_roles and plan.method != "full"
    from peftplan.planning.memory import (
        trainable_element_bytes,  # memory imports this module
    )

    lb = trainable_element_bytes(plan)
    latent_in = e * rank * (plan.method == "full") + (lb + bool(plan.dropout)) * rank * latent_wrapped
    out_copy = 0
    if "attn_out" in wrapped_roles and plan.method != "full" and plan.autocast == "none":
        out_copy = (lb + 1 if plan.dropout else lb if lb != ce else 0) * (h * v - card.d_q)
    return mla - generic + norms + latent_in + out_copy


def sink_eager_correction(card: ModelCard, plan: Plan, ce: int) -> float:
    """Bytes per token eager attention with attention sinks (gpt-oss: a learnt logit per head, Param role "sink")
    saves minus the generic eager count (q, k and v at h heads, a fp32 softmax output and its cast back to ce).

    transformers 5.24 models/gpt_oss eager_attention_forward: the sink column is concatenated to the b·h·s·s
    logits, their row max subtracted (max over the last dim saves its int64 indices, b·h·s), and the softmax runs
    in the logits' own dtype: its b·h·s·(s + 1) output is saved once (the A·V matmul reads a view of it), so
    ce·h·(s + 1) + 8·h per token in place of (4 + ce)·h·s. No autocast, no attention dropout (gpt-oss has none)."""
    if (plan.attention != "eager" or plan.autocast != "none" or card.attention_dropout > 0
            or not any(p.role == "sink" for p in layout(card).block_params)):
        return 0.0
    h, s = card.n_heads, plan.seq_len
    return ce * h * (s + 1) + 8 * h - (FP32 + (ce if ce != FP32 else 0)) * h * s


# model types whose eager attention upcasts q and k to fp32 before q @ kᵀ (transformers 5.24 models/gptj and
# models/codegen eager_attention_forward: `torch.matmul(query.to(torch.float32), key.to(torch.float32)...)`)
EAGER_FP32_QK_TYPES = ("gptj", "codegen")


def eager_fp32_qk_correction(card: ModelCard, plan: Plan, ce: int) -> float:
    """Bytes per token GPT-J's eager attention saves beyond the generic eager count (memory.py: q, k and v at
    ce, the fp32 softmax output and its cast back to ce): q @ kᵀ reads fp32 copies of q and k, which the matmul
    saves in place of the ce ones, (4 − ce)·(q + k) per token. Under autocast the matmul casts them back to the
    autocast dtype (what it saves), and with fp32 weights the copies are the tensors themselves: 0 there.
    Source: transformers 5.24 models/gptj/modeling_gptj.py eager_attention_forward."""
    if (plan.attention != "eager" or card.model_type not in EAGER_FP32_QK_TYPES or plan.autocast != "none"
            or ce >= FP32):
        return 0.0
    return (FP32 - ce) * (card.d_q + card.d_kv)


def block_key(card: ModelCard, plan: Plan) -> tuple:
    """What the terms here read beyond memory's per-block cache key: (s, b > 1) where a term depends on them."""
    if deberta_correction(card, plan, 2):
        return plan.seq_len, plan.batch_size
    if sdpa_math(card, plan) or sliding_mask_applies(card, plan) or falcon_eager_correction(card, plan, 2):
        return plan.seq_len, plan.batch_size > 1
    return ()


def block_correction(card: ModelCard, plan: Plan, e: int, ce: int, generic_norm: float,
                     weight_trains: bool, out_proj_saves_input: bool,
                     qk_grad: tuple[bool, bool] = (True, True), counted_norms: float = 2.0) -> float:
    """Every family term of one block, bytes per token (the one call `memory._block_saved_per_token` makes).
    e: the residual stream's bytes per element; ce: what attention saves per element; out_proj_saves_input:
    whether the attention output projection keeps its input alive (memory's `saves(attn_out)`)."""
    # memory.py counts only the block's d-wide residual norms (`counted_norms` of them, `generic_norm` bytes per
    # token each): the q/k and MLA latent norms come on top, whole (their generic share is 0)
    return (qk_norm_correction(card, plan, e, 0.0, weight_trains, qk_grad)
            + fp32_scale_correction(card, e, weight_trains) + fused_qkv_correction(card, plan, ce)
            + sliding_block_bytes(card, plan, ce) + parallel_norm_correction(card, e, counted_norms >= 2)
            + rotary_cat_correction(card, plan, ce, out_proj_saves_input)
            + sdpa_math_correction(card, plan, ce, out_proj_saves_input, qk_grad)
            + falcon_eager_correction(card, plan, ce) + sink_eager_correction(card, plan, ce)
            + eager_fp32_qk_correction(card, plan, ce) + attn_softcap_correction(card, plan, ce, qk_grad)
            + mla_correction(card, plan, e, ce, 0.0, weight_trains, _wrapped_roles(card, plan))
            + encoder_block_correction(card, plan, e, generic_norm, counted_norms) + deberta_correction(card, plan, ce))


def _wrapped_roles(card: ModelCard, plan: Plan) -> frozenset[str]:
    """Roles of the block Linears LoRA wraps (attn_latent: kv_b_proj / q_b_proj; attn_out: o_proj)."""
    if not plan.uses_lora or mla_dims(card) is None:
        return frozenset()
    from peftplan.planning.params import lora_targets

    return frozenset(lin.role for lin, in_block, _ in lora_targets(card, plan.targets) if in_block)


def attn_logit_softcap(card: ModelCard) -> float:
    """The attention-logit soft-cap (0: none), from the hand-written card's fields or the generated card's config."""
    cap = card.hf.get("attn_logit_softcapping") or card.config.get("attn_logit_softcapping")
    if not cap and isinstance(card.config.get("text_config"), dict):
        cap = card.config["text_config"].get("attn_logit_softcapping")
    return float(cap or 0.0)


def attn_softcap_correction(card: ModelCard, plan: Plan, ce: int, qk_grad: tuple[bool, bool]) -> float:
    """Bytes per token Gemma-2's eager attention saves beyond the generic eager count: the logits are soft-capped,
    cap·tanh(q·kᵀ·scaling / cap), before the mask; tanh saves its b·h·s·s output (ce) for its backward while the
    scaling and the two scalar ops save nothing, so ce·h·s per token, when q or k needs a gradient.
    Source: transformers 5.24 models/gemma2/modeling_gemma2.py eager_attention_forward (`softcap`)."""
    if plan.attention != "eager" or not (qk_grad[0] or qk_grad[1]) or not attn_logit_softcap(card):
        return 0.0
    return ce * card.n_heads * plan.seq_len


def logit_softcap(card: ModelCard) -> float:
    """The final logit soft-cap (0: none), from the hand-written card's fields or the generated card's config."""
    cap = card.hf.get("final_logit_softcapping") or card.config.get("final_logit_softcapping")
    if not cap and isinstance(card.config.get("text_config"), dict):
        cap = card.config["text_config"].get("final_logit_softcapping")
    return float(cap or 0.0)


# ---------------------------------------------------------------- encoder-only families

def biasless_layernorm_encoder(card: ModelCard) -> bool:
    """An encoder whose block norms are LayerNorms without bias (ModernBERT: `nn.LayerNorm(bias=norm_bias)`,
    norm_bias false), in pre-norm blocks, where memory.py counts an encoder's blocks as BERT's post-norm ones:
    the card's `norm` and its tree's norm entries (cardgen.norm_kind)."""
    norms = layout(card).block_norms
    return card.encoder and card.norm == "layernorm" and bool(norms) and not any(n.bias for n in norms)


def layernorm_saved(card: ModelCard, e: int) -> int:
    """Bytes per token a d-wide LayerNorm saves: its input x, mean and rstd (fp32)."""
    return e * card.d_model + 2 * FP32


def extra_norm_blocks(card: ModelCard) -> int:
    """How many of the first n_layers blocks have block norms that block 0 lacks (ModernBertEncoderLayer: layer
    0's attn_norm is nn.Identity, the others a LayerNorm): the tree's per-block norms outside block 0's list."""
    lay = layout(card)
    prefix = lay.block_prefix + "."
    idx = {int(n.name[len(prefix):].split(".", 1)[0]) for n in lay.other_norms
           if n.name.startswith(prefix) and n.name[len(prefix):].split(".", 1)[0].isdigit()}
    return sum(1 for i in idx if 0 < i < card.n_layers)


def chunked_glu(card: ModelCard) -> bool:
    """A gated MLP whose gate and up halves are one Linear's output split in two (ModernBertMLP: `input, gate =
    Wi(x).chunk(2, dim=-1)`; Phi-3's gate_up_proj): one ffn_in Linear, 2·d_ff wide (the card's tree)."""
    ffn_in = [x for x in layout(card).block_linears if x.role == "ffn_in"]
    return card.gated_mlp and len(ffn_in) == 1 and ffn_in[0].d_out == 2 * card.d_ff


def glu_grad(card: ModelCard, g):
    """memory's `_Grad` for the MLP of a chunked GLU: both halves are views of one output, so each needs a
    gradient when either does (memory._needs_grad reads gate and up from the Linears' names, which ModernBERT's
    `Wi` does not carry)."""
    if not chunked_glu(card) or g.gate == g.up:
        return g
    import dataclasses

    return dataclasses.replace(g, gate=True, up=True)


def encoder_block_correction(card: ModelCard, plan: Plan, e: int, generic_norm: float,
                             counted_norms: float = 2.0) -> float:
    """Bytes per token (averaged over the blocks) ModernBERT's pre-norm block saves beyond memory.py's post-norm
    encoder count (`counted_norms` norms whose input needs a gradient, `generic_norm` bytes per token each):
    - each of its `wide` block LayerNorms (input, mean, rstd) reads an input that needs a gradient;
    - blocks after the first have an attention LayerNorm too (the tree's per-block norms outside block 0's).
    (ModernBERT's GLU is the card's gated MLP with chunked_glu's gradient rule; its fused Wqkv, its rotary copy
    of the attention output and the sliding-window masks are the fused_qkv, rotary_cat and sliding-window
    terms above.)"""
    if not biasless_layernorm_encoder(card):
        return 0.0
    # block 0 of ModernBERT lacks the attention norm: the other blocks' are extra_norm_blocks
    wide = len(layout(card).block_norms) - len(qk_norms(card))
    total = wide * layernorm_saved(card, e) - counted_norms * generic_norm
    return total + layernorm_saved(card, e) * extra_norm_blocks(card) / card.n_layers


def outside_correction(card: ModelCard, plan: Plan) -> float:
    """Bytes per token ModernBERT saves outside the blocks beyond memory.outside_saved_per_token's encoder count:
    the final_norm after the last block (which the BERT-style count has not) saves its input, mean and rstd
    (the embedding and head LayerNorms are memory's, from the card's norm)."""
    if not biasless_layernorm_encoder(card):
        return 0.0
    from peftplan.planning import (
        memory,  # memory imports this module: imported here, at call time
    )

    e = memory.stream_element_bytes(plan, card)
    return layernorm_saved(card, e)  # a LoRA-wrapped head.dense: dora.outside_saved_per_token


def deberta_span(card: ModelCard) -> int:
    """P = 2·att_span relative positions DeBERTa-v2's attention scores against (DisentangledSelfAttention:
    att_span = position_buckets when > 0, else max_relative_positions, else max_position_embeddings)."""
    cfg = card.config
    span = int(cfg.get("position_buckets", -1) or -1)
    if span <= 0:
        span = int(cfg.get("max_relative_positions", -1) or -1)
    if span <= 0:
        span = int(cfg.get("max_position_embeddings", 512))
    return 2 * span


def deberta_correction(card: ModelCard, plan: Plan, ce: int) -> float:
    """Bytes per token DeBERTa-v2's eager disentangled attention (transformers' DisentangledSelfAttention with
    share_att_key, pos_att_type c2p|p2c) saves beyond memory.py's generic eager count, the block's trainable
    inputs requiring gradients (full fine-tuning, LoRA on its attention):
    - c2p = q·pos_kᵀ and p2c = k·pos_qᵀ, (b·h, s, P) each, kept by the gathers that follow: 2·ce·h·P;
    - pos_k and pos_q, the shared query/key projections of the P relative embeddings repeated over the batch,
      (b·h, P, d_h) each, kept by those matmuls: 2·ce·d·P/s;
    - the two gather indices, one (s, s) int64 storage each, expanded over b·h: 2·8·s/b;
    - k once more, transposed ((b·h, d_h, s) for q·kᵀ beside (b·h, s, d_h) for p2c): ce·q;
    - the inputs of the query/key projections of the P relative embeddings (deberta_rel_proj), per step;
    - the bool b×1×s×s attention mask of the masked softmax: s;
    - softmax in the scores' dtype (ce, where the generic count has fp32 and a cast) and, with
      attention_probs_dropout_prob > 0, its bool mask and dropped output: ce·h·s + (1 + ce)·h·s;
    - with hidden_dropout_prob > 0, a bool mask per sublayer output: 2·d (the card's dropout fields are 0).
    """
    if card.model_type != "deberta-v2" or plan.attention != "eager":
        return 0.0
    cfg, h, d, s, b = card.config, card.n_heads, card.d_model, plan.seq_len, plan.batch_size
    P = deberta_span(card)
    p_drop = float(cfg.get("attention_probs_dropout_prob", 0.0) or 0.0)
    real = ce * card.d_q + 2 * ce * h * P + 2 * ce * d * P / s + 2 * 8 * s / b + s
    real += deberta_rel_proj(card, plan, ce) / (b * s)
    real += ce * h * s + ((1 + ce) * h * s if p_drop > 0 else 0)
    sm = FP32  # memory.py: softmax in fp32 (not the gpt2/bert list) and, without dropout, its cast to ce
    generic = (sm + (1 + ce if card.attention_dropout > 0 else (ce if sm != ce else 0))) * h * s
    hidden = 2 * d if float(cfg.get("hidden_dropout_prob", 0.0) or 0.0) > 0 and not card.hidden_dropout else 0
    return real - generic + hidden


def deberta_rel_proj(card: ModelCard, plan: Plan, ce: int) -> float:
    """Bytes per step the query_proj/key_proj applied to the P relative embeddings keep (not per token: the
    (P, d) embeddings are the same for every sequence): full fine-tuning saves their one shared input, ce·P·d;
    LoRA on a projection saves the cast of that input to the adapter dtype and A·x, (d + r) per row each."""
    from peftplan.planning.memory import DTYPES
    from peftplan.planning.params import lora_targets

    P, d = deberta_span(card), card.d_model
    if plan.method == "full":
        return ce * P * d
    if not plan.uses_lora:
        return 0.0
    wrapped = {lin.name.rsplit(".", 1)[-1] for lin, in_block, _ in lora_targets(card, plan.targets) if in_block}
    a = DTYPES[plan.adapter_dtype]
    return sum(a * (d + plan.r) * P for n in ("query_proj", "key_proj") if n in wrapped)


# Families whose activation memory is not modelled per tensor yet (held to the trace: README "What is exact for
# generated cards"): the estimate still counts parameters exactly, and says its memory is an approximation.
NOT_MODELLED = {"deberta-v2": "DeBERTa-v2's SDPA path (its class has only eager attention, which is modelled)"}


def warnings(card: ModelCard, plan: Plan | None = None) -> list[str]:
    """What the memory model does not cover for this card (and plan), one line each (empty when it is held to
    the trace). DeBERTa-v2 is modelled with eager attention, the only one its class has; multi-head latent
    attention for SDPA / flash attention, not eager (`plan.attention`)."""
    plan_eager = plan is not None and plan.attention == "eager"
    missing = []
    if card.cross_attention and plan is not None and plan.use_dora:  # planning/seq2seq.py, planning/dora.py
        missing.append("DoRA on an encoder-decoder (its encoder's weight-norm terms)")
    if card.cross_attention and plan is not None and plan.method == "top" and plan.grad_checkpointing:
        missing.append("checkpointed top-k on an encoder-decoder (the encoder's recomputed backward beside every "
                       "gradient)")
    if card.model_type in NOT_MODELLED and not (card.model_type == "deberta-v2" and plan_eager):
        missing.append(NOT_MODELLED[card.model_type])
    latent = any(lin.role == "attn_latent" for lin in layout(card).block_linears)
    if latent and (plan is None or plan.attention not in ("sdpa", "flash") or mla_dims(card) is None):
        missing.append("multi-head latent attention (MLA) with eager attention")
    if not missing:
        return []
    return [f"{card.name}'s activation memory is approximate: {', '.join(missing)} not modelled yet (parameters, "
            f"weights, gradients and optimizer states are exact)"]


# Masked-LM classes whose loss is transformers' `ForMaskedLMLoss` (self.loss_function), which calls
# `logits.float()` before cross_entropy (transformers/loss/loss_utils.py); BERT/RoBERTa/DeBERTa-v2 call
# `CrossEntropyLoss` on the logits in their own dtype. A trait of the class, named by family.
MLM_LOSS_UPCAST_FAMILIES = ("modernbert",)


def mlm_loss_upcasts(card: ModelCard) -> bool:
    """Whether the masked-LM loss runs on an fp32 copy of the logits (ModernBertForMaskedLM.forward)."""
    return card.encoder and card.family in MLM_LOSS_UPCAST_FAMILIES


# Classes with no SDPA / flash path in transformers 5.24 (`_supports_sdpa` false or refused): a trait of the class,
# named by family. The estimate warns for another attention; the random draw gives them eager.
EAGER_ONLY_FAMILIES = ("gemma2", "gpt_oss", "deberta-v2", "bloom")


def eager_only(card: ModelCard) -> bool:
    return card.family in EAGER_ONLY_FAMILIES or card.model_type in EAGER_ONLY_FAMILIES

