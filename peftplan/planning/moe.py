"""Mixture-of-experts terms of the memory estimate (Mixtral, Qwen3-MoE and the other transformers-5 MoE blocks).

Symbols: t = b·s tokens, d hidden, E routed experts, k experts per token, f = expert_d_ff, S = t·k (token,
expert) pairs, e bytes per activation element. Facts come from the generated card: E, k, f (`n_experts`,
`experts_per_token`, `expert_d_ff`), the router's behaviour (`router_norm_topk`, `router_weights_fp32`), the
auxiliary loss (`router_aux_loss`, config.output_router_logits) and whether the experts are fused 3-D parameters
(layout Params with role "expert").

What one MoE block runs (transformers 5.24, modeling_mixtral.py / modeling_qwen3_moe.py, and the default
experts kernel `grouped_mm_experts_forward` in transformers/integrations/moe.py):

    router   logits = x·W_rᵀ (t×E); softmax in fp32 (saved, t×E); top-k (indices t×k int64 saved);
             optionally the k weights renormalised in place (saves the t×1 sum and a copy of the k values)
    experts  sort the S expert ids (perm, int64); gather x[perm // k] (S×d; saved when the experts train);
             gate_up = grouped_mm (S×2f, saved: the activation reads its gate half, the product its up half);
             act(gate) (S×f, saved by the product); h = act·up (S×f, saved when down_proj trains);
             down = grouped_mm (S×d, saved by the routing-weight product); routing weights gathered (S, fp32 in
             Mixtral, e in Qwen3-MoE, saved); the inverse permutation (int64 S, saved); the weighted S×d
             output (fp32 when the weights are), summed over k back to t×d.

Routing. The kernel handles all S pairs as one sorted batch with per-expert offsets, so every tensor above has S
rows whatever the router picks: memory is the same under `balanced` (each expert ⌊S/E⌋ or ⌈S/E⌉ tokens) and
`worst` (k experts get all t tokens, the rest none) — the trace forces each rule (peftplan/trace/moe.py) and
measures equal peaks. What the routing changes is how the grouped GEMM's work splits over experts (the busiest
expert's tokens, `tokens_per_expert`), shown in the breakdown for both rules.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

from peftplan.planning.cards import ModelCard
from peftplan.planning.layout import layout
from peftplan.plan import Plan

FP32, INT64 = 4, 8
# Routers whose logits are F.linear(x.type(fp32), W.type(fp32)) (DeepseekV2TopkRouter): a trained router saves the
# fp32 copy of its input. A class trait no config field states, named by model type as cardgen's
# _ROUTER_FP32_WEIGHTS is.
ROUTER_FP32_INPUT = frozenset({"deepseek_v2", "deepseek_v3"})
# Routers that take the top-k of the logits and softmax the k values in the activation dtype (GptOssTopKRouter):
# they save the k softmax outputs (e each), not a fp32 softmax over all E experts.
ROUTER_TOPK_THEN_SOFTMAX = frozenset({"gpt_oss"})
# Experts whose gate is gpt-oss's clamped SwiGLU (GptOssExperts._apply_gate): gate and up are strided views of
# the gate_up output (which clamp saves), then clamp(gate), sigmoid(α·gate), up + 1 and their product glu are
# saved (4f) where act(gate) is (f).
CLAMPED_SWIGLU = frozenset({"gpt_oss"})


def tokens_per_expert(tokens: int, k: int, n_experts: int, routing: str) -> tuple[int, ...]:
    """Tokens each of the E experts processes in one block, for t tokens (sums to t·k).

    balanced: ⌊t·k/E⌋ or ⌈t·k/E⌉ each (the trace's rule: token i's j-th expert is (i·k + j) mod E);
    worst: the same k experts get all t tokens, the other E − k none.
    """
    if routing == "worst":
        return tuple(tokens if i < k else 0 for i in range(n_experts))
    q, rem = divmod(tokens * k, n_experts)
    return tuple(q + (i < rem) for i in range(n_experts))


@dataclass(frozen=True)
class Routing:
    """What the estimate assumes about routing, for the breakdown (both rules are shown)."""
    n_experts: int  # E
    experts_per_token: int  # k
    pairs: int  # S = t·k (token, expert) pairs per block
    busiest_expert_tokens_balanced: int  # ⌈t·k/E⌉
    busiest_expert_tokens_worst: int  # t
    chosen: str  # the plan's --moe-routing
    memory_depends_on_routing: bool  # False for transformers 5's grouped-GEMM experts (see module docstring)


def routing(card: ModelCard, plan: Plan) -> Routing | None:
    """Routing figures for a MoE card; None for a dense one."""
    if not card.moe:
        return None
    t, k, E = plan.tokens, card.experts_per_token, card.n_experts
    return Routing(n_experts=E, experts_per_token=k, pairs=t * k,
                   busiest_expert_tokens_balanced=max(tokens_per_expert(t, k, E, "balanced")),
                   busiest_expert_tokens_worst=max(tokens_per_expert(t, k, E, "worst")),
                   chosen=plan.moe_routing, memory_depends_on_routing=False)


def fused_experts(card: ModelCard) -> bool:
    """The routed experts are fused 3-D parameters (transformers 5: mlp.experts.gate_up_proj / down_proj)."""
    return any(p.expert and len(p.shape) == 3 for p in moe_block_params(card))


def _moe_prefix(card: ModelCard) -> str:
    """'' when the repeated block holds the experts; else the lowest MoE layer's name prefix
    ('model.layers.1.' in DeepSeek-V2, whose first_k_dense_replace first blocks are dense)."""
    lay = layout(card)
    if any(p.expert for p in lay.block_params):
        return ""
    first = next((p.name for p in lay.other_params if p.expert), "")
    m = re.match(r"(.*\.layers\.\d+\.)", first)
    return m.group(1) if m else ""


def _relative(name: str) -> str:
    return re.sub(r"^.*\.layers\.\d+\.", "", name)


def moe_block_params(card: ModelCard) -> tuple:
    """One MoE block's Params (router, experts; layout.Param), named within the block: the repeated block's, or,
    when blocks differ (dense first blocks), the lowest MoE layer's."""
    prefix = _moe_prefix(card)
    if not prefix:
        return layout(card).block_params
    return tuple(replace(p, name=p.name[len(prefix):]) for p in layout(card).other_params
                 if p.name.startswith(prefix))


def weights_bytes(card: ModelCard, e: int) -> int:
    """Element size of the routing weights the experts multiply by: fp32 when the router keeps its softmax's
    fp32 (Mixtral), else cast back to the activation dtype (Qwen3-MoE: `.to(router_logits.dtype)`)."""
    return FP32 if card.router_weights_fp32 else e


def router_saved_per_token(card: ModelCard, e: int, router_trains: bool) -> int:
    """Bytes per token the router saves: its input x when W_r trains, the fp32 softmax (E), the top-k indices
    (int64 k); renormalising in place (`router_top_value /= sum`) saves the t×1 fp32 sum and a copy of the k
    fp32 values autograd keeps for the divisor's gradient. A router that computes its logits in fp32
    (ROUTER_FP32_INPUT) saves the fp32 copy of x instead."""
    E, k, d = card.n_experts, card.experts_per_token, card.d_model
    x = FP32 if card.model_type in ROUTER_FP32_INPUT else e
    probs = e * k if card.model_type in ROUTER_TOPK_THEN_SOFTMAX else FP32 * E
    total = x * d * router_trains + probs + INT64 * k
    if card.router_norm_topk:
        total += FP32 * k + FP32
    return total


def experts_saved_per_token(card: ModelCard, e: int, gate_up_trains: bool, down_trains: bool) -> int:
    """Bytes per token the grouped-GEMM experts save (k rows per token, module docstring): three int64 index
    tensors (perm // k, perm, inverse perm), gate_up output (2f), act(gate) (f), down output (d), the routing
    weight; the gathered input (d) when gate_up trains, act·up (f) when down_proj trains."""
    k, d, f = card.experts_per_token, card.d_model, card.expert_d_ff
    gate = 4 * f if card.model_type in CLAMPED_SWIGLU else f
    per_pair = 3 * INT64 + e * (2 * f + gate + d) + weights_bytes(card, e)
    per_pair += e * d * gate_up_trains + e * f * down_trains
    return k * per_pair


def block_saved_per_token(card: ModelCard, plan: Plan, e: int, trains: bool) -> int:
    """The MoE block's saved bytes per token (router + experts), in place of a dense MLP's; `trains`: the block's
    own weights train (full fine-tuning, top-k). peft's LoRA on a fused parameter makes the merged weight need a
    gradient, so its op saves what a trained one saves."""
    wrapped = lora_wrapped(card, plan)
    router = trains or any(p.role == "router" for p in wrapped)
    gate_up = trains or any(p.name.endswith("gate_up_proj") for p in wrapped)
    down = trains or any(p.name.endswith("down_proj") for p in wrapped)
    return (router_saved_per_token(card, e, router) + experts_saved_per_token(card, e, gate_up, down)
            + aux_loss_bytes_per_token(card, e) + shared_experts_saved_per_token(card, plan, e, trains))


# ---------------------------------------------------------------- shared experts, dense first blocks (DeepSeek-V2)


def _other_linears(card: ModelCard, roles: tuple[str, ...]) -> tuple:
    return tuple(x for x in layout(card).other_linears if x.role in roles)


def _shared_linears(card: ModelCard, roles: tuple[str, ...]) -> tuple:
    """The shared experts' Linears of one MoE block: the repeated block's, or the lowest MoE layer's."""
    inside = tuple(x for x in layout(card).block_linears if x.role in roles)
    prefix = _moe_prefix(card)
    return inside or tuple(x for x in _other_linears(card, roles) if prefix and x.name.startswith(prefix))


def _wrapped_other(card: ModelCard, plan: Plan) -> frozenset[str]:
    """Names of the Linears LoRA wraps (full names outside the repeated block, block-relative inside)."""
    if not plan.uses_lora:
        return frozenset()
    return frozenset(lin.name for lin, in_block, _ in _targets(card, plan))


def _gated_mlp_saved(card: ModelCard, plan: Plan, e: int, f: int, trains: bool, gate_up_wrapped: bool,
                     down_wrapped: bool) -> float:
    """A gated MLP act(x·W_gᵀ) ⊙ x·W_uᵀ → W_d of width f: gate, act(gate) and up (3f); the product when down_proj
    trains or LoRA wraps it (f); its input x (d) when gate/up train or are wrapped (read by both); LoRA's A·x (r)
    per wrapped Linear, saved by B (memory._block_saved_per_token's rules, no dropout, no autocast)."""
    d = card.d_model
    total = 3 * e * f + e * f * (trains or down_wrapped) + e * d * (trains or gate_up_wrapped)
    if plan.dropout and not trains:  # each wrapped Linear's dropout output and mask, in place of a shared x
        total += (e + 1) * (2 * d * gate_up_wrapped + f * down_wrapped) - e * d * gate_up_wrapped \
            - e * f * down_wrapped
    return total + e * plan.r * (2 * gate_up_wrapped + down_wrapped)


def shared_experts_saved_per_token(card: ModelCard, plan: Plan, e: int, trains: bool) -> float:
    """Bytes per token the shared experts save (DeepSeek-V2's `shared_experts`, a gated MLP every token passes
    through, width n_shared·expert_d_ff, role shared_ffn_in/out in the module tree): 0 without them."""
    gate = _shared_linears(card, ("shared_ffn_in",))
    if not gate:
        return 0.0
    wrapped = _wrapped_other(card, plan)
    down = _shared_linears(card, ("shared_ffn_out",))
    return _gated_mlp_saved(card, plan, e, gate[0].d_out, trains, any(x.name in wrapped for x in gate),
                            any(x.name in wrapped for x in down))


def dense_blocks(card: ModelCard) -> tuple[int, ...]:
    """Indices of the blocks whose MLP is a dense gated MLP, not the experts (DeepSeek-V2's
    first_k_dense_replace first blocks): those with role ffn_in Linears outside the repeated block."""
    idx = set()
    for x in _other_linears(card, ("ffn_in",)):
        parts = x.name.split(".")
        idx |= {int(parts[i + 1]) for i, p in enumerate(parts[:-1]) if p == "layers" and parts[i + 1].isdigit()}
    return tuple(sorted(i for i in idx if i < card.n_layers))


def dense_block_adjust(card: ModelCard, plan: Plan, blocks: list, e: int) -> list:
    """Per-block saved bytes per token with each dense first block's MLP in place of the MoE terms the list
    counted for it (router, experts, shared experts, peft's merged expert stacks); `blocks` are the top
    len(blocks) of the card's n_layers blocks, bottom first."""
    dense = dense_blocks(card) if card.moe else ()
    if not dense:
        return blocks
    trains = plan.method in ("full", "top")
    wrapped = _wrapped_other(card, plan)
    out, low = list(blocks), card.n_layers - len(blocks)
    for i in dense:
        if i < low:
            continue
        lin = [x for x in _other_linears(card, ("ffn_in", "ffn_out")) if f".layers.{i}." in f".{x.name}"]
        gate = [x for x in lin if x.role == "ffn_in"]
        mlp = _gated_mlp_saved(card, plan, e, gate[0].d_out, trains, any(x.name in wrapped for x in gate),
                               any(x.name in wrapped for x in lin if x.role == "ffn_out"))
        moe_terms = block_saved_per_token(card, plan, e, trains) + lora_merged_bytes(card, plan) / plan.tokens
        out[i - low] += mlp - moe_terms
    return out


# ---------------------------------------------------------------- peft's LoRA on fused parameters (ParamWrapper)


def lora_wrapped(card: ModelCard, plan: Plan) -> tuple:
    """The block Params (layout.Param) peft's LoRA wraps with a ParamWrapper (moe_targets: all-linear or the v4
    expert names on the model types peft rewrites); () when none."""
    if not (card.moe and plan.uses_lora):
        return ()
    from peftplan.planning.params import lora_targets

    names = {lin.name for lin, in_block, _ in lora_targets(card, plan.targets) if lin.role == "param_lora" and in_block}
    names |= {_relative(n) for lin, in_block, _ in lora_targets(card, plan.targets)
              if lin.role == "param_lora" and not in_block and (n := lin.name).startswith(_moe_prefix(card))}
    return tuple(p for p in moe_block_params(card) if p.name in names)


def lora_merged_bytes(card: ModelCard, plan: Plan) -> int:
    """Bytes per block peft's ParamWrapper keeps for backward (peft/tuners/lora/layer.py, `_activate_lora`):
    on each forward a fused (E, a, b) expert stack is replaced by W + scaling·lhs@rhs (`_LoraFactorsProxy`, one
    baddbmm in W's dtype) and a 2-D router weight by W + ΔW (`_LoraParameterProxy`); the op reading it saves the
    merged weight (its input's gradient needs it), the baddbmm its two factors cast to W's dtype
    (`get_delta_factors`: `lhs.to(param.dtype)`, a no-op returning views of A and B when the adapter is in W's
    dtype already, `--adapter-dtype` = the weights': then nothing beyond the parameters)."""
    from peftplan.planning.memory import DTYPES  # memory imports this module

    e = plan.bytes_per_element
    factors_cast = DTYPES[plan.adapter_dtype] != e
    total = 0
    for p in lora_wrapped(card, plan):
        total += e * p.numel
        if len(p.shape) == 3 and factors_cast:
            from peftplan.planning.moe_targets import param_lora_shape

            mult = 2 if p.name.endswith("gate_up_proj") else 1
            d_in, d_out = param_lora_shape(p.shape, mult)
            total += e * plan.r * (d_in + d_out)
    return total


def working_bytes(card: ModelCard, plan: Plan, e: int, trained: bool) -> tuple[int, int, int]:
    """(forward, backward, top block's backward) transient bytes of one MoE block beyond what it saves, in
    place of the dense FFN's `ffn_fwd`, `ffn_bwd`, `ffn_bwd_top` (memory.phases).

    forward (a block that saves nothing: checkpointed), the larger of two moments (measured on the trace): after
    the gate_up GEMM, the gathered input (S×d, a Python local to the end of the kernel), gate_up's output (S×2f),
    act(gate) and act·up (S×f each); at the end, the gathered input, the down output, the weighted output (fp32
    when the weights are) and its un-permuted copy (S×d each), and two t×d tensors of the block.
    backward (measured): the gradient entering the block (t×d), then down_proj's input gradient (S×f) and the
    gated product's two factor gradients (S×f each) live together, while the down output and the routing weight
    the weighted product saved are freed.
    peft's LoRA on the fused experts (ParamWrapper): the merged gate_up stack exists from its first use to the end
    of the kernel, the merged down stack from its first use; in backward the merged down stack's full-size
    gradient is made before the baddbmm hands it to the LoRA factors.
    """
    t, k, d, f = plan.tokens, card.experts_per_token, card.d_model, card.expert_d_ff
    S, w = t * k, weights_bytes(card, e)
    wide = max(w, e)
    wrapped = lora_wrapped(card, plan)
    merged = {p.name.rsplit(".", 1)[-1]: plan.bytes_per_element * p.numel for p in wrapped if len(p.shape) == 3}
    gate_up, down = merged.get("gate_up_proj", 0), merged.get("down_proj", 0)
    fwd = max(S * e * (d + 4 * f) + gate_up, S * (2 * e * d + 2 * wide * d) + 2 * t * e * d + gate_up + down)
    bwd = S * (3 * e * f - e * d - w) + t * e * d
    if down:  # with down's input gradient and the fp32 and e copies of the gradient entering the block
        bwd = max(bwd, S * e * f + down + t * d * (FP32 + e))
    # accumulating (grad_accum > 1), each new weight gradient is added into the existing .grad and freed at once
    # (autograd's AccumulateGrad), so down_proj's gradient is gone when gate_up's is made (measured): down_grad 0,
    # the rest of the moments below as without accumulation (the saved tensors G frees are freed all the same)
    if trained:
        down_grad = plan.bytes_per_element * sum(p.numel for p in moe_block_params(card)
                                                 if p.expert and p.name.endswith("down_proj")) * (plan.grad_accum == 1)
        # the lowest block's backward, at gate_up's weight gradient: down_proj's gradient exists (not yet counted
        # among the late gradients); act·up, the down output and the weighted product's saved operand are freed
        # (G); earlier, at the gated product's backward (M), gate_up's gradient (the step's largest, which
        # memory.phases adds) does not exist yet but the gated product's gradients do (both measured)
        gate_up_grad = plan.bytes_per_element * sum(p.numel for p in moe_block_params(card)
                                                    if p.expert and p.name.endswith("gate_up_proj"))
        bwd = max(down_grad - S * (e * (f + d) + wide * d),
                  down_grad + S * e * (2 * f - d) + t * e * d - gate_up_grad)
    return fwd, bwd, bwd


def aux_loss_bytes_per_token(card: ModelCard, e: int) -> int:
    """config.output_router_logits (`router_aux_loss`): transformers records every block's t×E router logits
    (OutputRecorder) for `load_balancing_loss_func` (Switch Transformer's load-balancing loss, Fedus et al. 2021,
    Eq. 4-6), which keeps one t×E tensor per block (the softmax its backward reads) from the block's forward to
    its backward: E·e bytes per token and block (measured: Qwen3-30B-A3B, 8 blocks, t = 4096: +8.0 MiB)."""
    return card.n_experts * e if card.router_aux_loss else 0


# ---------------------------------------------------------------- what the estimate refuses or flags


def expert_params(card: ModelCard) -> int:
    """Parameters of the fused 3-D routed-expert tensors, all blocks (bitsandbytes leaves them unquantized)."""
    lay = layout(card)
    per_block = sum(p.numel for p in lay.block_params if p.expert and len(p.shape) == 3)
    return card.n_layers * per_block + sum(p.numel for p in lay.other_params if p.expert and len(p.shape) == 3)


def refuse(card: ModelCard, plan: Plan) -> None:
    """Raise PlanError for what the users' stack cannot run on fused experts.

    QLoRA with k-bit preparation: transformers' bitsandbytes quantizer replaces `nn.Linear` modules only
    (integrations/bitsandbytes.py), so the fused 3-D experts stay in bf16; peft's prepare_model_for_kbit_training
    then casts every non-4-bit parameter to fp32, experts included, and the grouped-GEMM experts kernel refuses
    fp32 operands ("Expected inputs of BF16 type", seen in the trace).
    """
    from peftplan.errors import PlanError

    if card.moe and plan.method == "qlora" and plan.kbit_prep and fused_experts(card):
        raise PlanError(f"QLoRA on {card.name}: bitsandbytes quantizes only Linears, its "
                        f"{expert_params(card) / 1e9:.1f}B fused expert parameters stay bf16, and k-bit "
                        "preparation would upcast them to fp32, which the grouped-GEMM experts refuse; "
                        "pass --no-kbit-prep")


def warnings(card: ModelCard, plan: Plan) -> list[str]:
    """Notes on MoE plans: unquantized experts under QLoRA; peft's LoRA on fused experts (not modelled)."""
    out = []
    if not card.moe:
        return out
    if plan.method == "qlora" and fused_experts(card):
        out.append(f"bitsandbytes quantizes only Linears: {card.name}'s {expert_params(card) / 1e9:.1f}B fused "
                   f"expert parameters stay in {plan.dtype} (counted so)")
    gaps = unmodelled(card)
    if gaps:
        out.append(f"{card.name}'s MoE memory is approximate: {', '.join(gaps)} not modelled yet (the MoE terms are "
                   "held to the trace on Mixtral, Qwen3-MoE, DeepSeek-V2 and gpt-oss blocks)")
    return out


def unmodelled(card: ModelCard) -> list[str]:
    """The card's MoE features the memory terms do not cover yet, from its facts (empty for Mixtral, Qwen3-MoE,
    DeepSeek-V2, whose shared experts and dense first blocks are modelled, gpt-oss, whose biased clamped-SwiGLU
    experts are)."""
    gaps = []
    if card.n_shared_experts and not _shared_linears(card, ("shared_ffn_in",)):
        gaps.append("shared experts that are not gated-MLP Linears")
    if not fused_experts(card):
        gaps.append("experts as Linears")
    if any(p.expert and p.name.endswith("_bias") for p in moe_block_params(card)) \
            and card.model_type not in CLAMPED_SWIGLU:
        gaps.append("experts with biases and their own gated activation")
    return gaps


def _targets(card: ModelCard, plan: Plan):
    from peftplan.planning.params import lora_targets

    return lora_targets(card, plan.targets)


def lowest_block_gradient(card: ModelCard, plan: Plan, largest: int) -> int:
    """What memory.phases adds for the gradient being written at the lowest block's backward peak, bytes:
    `largest`, the block's largest gradient, for a dense block. With peft's merged expert stacks (LoRA on fused
    experts) the peak is a merged stack's full-size gradient, before any of the block's LoRA factor gradients is
    accumulated: `working_bytes` counts down_proj's (beside every saved tensor); gate_up_proj's comes after
    down's merged stack and its factor casts are freed, with down's factor gradients alive in the stack's dtype
    (both measured, with and without accumulation and checkpointing). Returned: how much gate_up's moment
    exceeds down's (0 when it does not)."""
    merged = {p.name.rsplit(".", 1)[-1]: p for p in lora_wrapped(card, plan) if len(p.shape) == 3}
    if not merged:
        return largest
    if "down_proj" not in merged or "gate_up_proj" not in merged:
        return 0
    from peftplan.planning.memory import DTYPES  # memory imports this module
    from peftplan.planning.moe_targets import param_lora_shape

    e, t, S = plan.bytes_per_element, plan.tokens, plan.tokens * card.experts_per_token
    down, gate_up = e * merged["down_proj"].numel, e * merged["gate_up_proj"].numel
    factors = e * plan.r * sum(param_lora_shape(merged["down_proj"].shape, 1))  # down's, in the stack's dtype
    casts = factors if DTYPES[plan.adapter_dtype] != e else 0  # get_delta_factors' `.to(param.dtype)` copies
    at_gate_up = gate_up - down - casts + factors
    at_down = S * e * card.expert_d_ff + down + t * card.d_model * (FP32 + e)  # working_bytes' merged moment
    return max(0, at_gate_up - at_down)
