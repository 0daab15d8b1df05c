"""Training FLOPs of one step, exact per plan and architecture: every matmul autograd runs, by kind.

FLOPs (`step_flops`): every matrix product of one training step, as autograd runs it, 2·m·n·k each.

    forward          2·T·d_in·d_out per Linear (block linears, other linears, the output head), T = b·s tokens
                     (Kaplan et al. 2020 §2.1; Narayanan et al. 2021 §5.1)
    input gradients  dX = dY·W: 2·T·d_in·d_out, only where the Linear's input requires grad: autograd skips it
                     below the lowest trainable parameter (torch/csrc/autograd: needs_input_grad)
    weight gradients dW = dYᵀ·X: 2·T·d_in·d_out, only for trainable weights (full, the top-k blocks)
    LoRA             per target A (r×d_in), B (d_out×r) (Hu et al. 2021 §4.1): forward 2·T·r·(d_in + d_out),
                     dW the same, dX through B 2·T·r·d_out, through A 2·T·d_in·r where the input requires grad
    adapters         down d→m, up m→d (Houlsby et al. 2019 §2.1): forward 4·T·d·m, dW the same, dX through up
                     2·T·d·m, through down 2·T·d·m where its input requires grad
    attention        QKᵀ and P·V, 2·T·s·d_q each per block without masking; causal flash/SDPA kernels skip the
                     masked blocks: s(s+1)/2 pairs (FlashAttention-2, Dao 2023 §3.1.1); the flash backward is
                     2.5× its forward (recomputes QKᵀ: Dao 2023 §4.1); eager backward runs dP, dV, dQ, dK as bmm
    experts          a MoE block (Mixtral, Qwen3-MoE, DeepSeek-V2, gpt-oss; transformers 5's grouped-GEMM experts,
                     integrations/moe.py) runs the router x·W_rᵀ (2·T·d·E) and, for the S = k·T (token, expert)
                     pairs, gate_up and down as torch._grouped_mm: 2·S·a·b per (E, a, b) stack for the forward,
                     the input gradient (by the stage rule above) and the weight gradient (trained, or merged by
                     peft's LoRA); shared experts and dense first blocks (DeepSeek-V2) are Linears of their layer.
                     peft's ParamWrapper (peft/tuners/lora/layer.py) folds W + s·lhs@rhs into one baddbmm
                     (2·E·a·R·b, R = r or 2r on gate_up), run twice per forward (torch's register_parametrization
                     evaluates it once to check the shape), two bmm for the factors' gradients; a 2-D router's
                     delta B·A is one mm (2·E·r·d), two in backward: FLOPs that do not scale with T (`fixed`)
    checkpointing    each checkpointed block's forward runs again in backward (Chen et al. 2016), and transformers
                     makes the embedding output require grad (modeling_utils `_activation_checkpointing_enable`:
                     enable_input_require_grads), so every block computes input gradients. Non-reentrant
                     checkpointing (transformers ≥ 5 default) stops recomputing after the block's last saved
                     tensor (torch/utils/checkpoint.py, early stop): the block's final matmul is not re-run when
                     nothing after it saves a tensor (a residual add saves none); reentrant re-runs all of it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, fields
from functools import lru_cache
from operator import attrgetter

from peftplan.planning.cards import ModelCard
from peftplan.planning.layout import Linear, layout
from peftplan.planning.params import ParamCounts, lora_targets
from peftplan.plan import Plan


@dataclass(frozen=True)
class Stack:
    """How the training stack runs the plan where it changes the time but not the plan's memory.

    reentrant      torch.utils.checkpoint(use_reentrant=True): the HF Trainer default before transformers 5;
                   transformers ≥ 5 and peftplan's own step use non-reentrant
    adapter_dtype  storage of the LoRA/adapter weights when it differs from the plan's ("fp32": peft's
                   autocast_adapter_dtype with a bf16 base and no autocast, so x is cast to fp32 at each target)
    """

    reentrant: bool = False
    adapter_dtype: str | None = None


DEFAULT_STACK = Stack()
_LAYER = re.compile(r"\.layers\.(\d+)\.")

# ---------------------------------------------------------------- which inputs need gradients

# Position of a block Linear in the block's data flow: 0 attention inputs, 1 attention output, 2 MLP inputs,
# 3 MLP output. Full relative names first, then the last component.
_STAGES = {"attn.c_proj": 1, "mlp.c_proj": 3, "attention.output.dense": 1, "output.dense": 3,
           "intermediate.dense": 2}
_STAGE_BY_LEAF = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "query": 0, "key": 0, "value": 0, "c_attn": 0,
                  "qkv_proj": 0, "o_proj": 1, "out_proj": 1, "gate_proj": 2, "up_proj": 2, "fc1": 2, "c_fc": 2,
                  "gate_up_proj": 2, "down_proj": 3, "fc2": 3}
_ROLE_BY_LEAF = {"q_proj": "q", "query": "q", "k_proj": "k", "key": "k", "v_proj": "v", "value": "v",
                 "c_attn": "qkv", "qkv_proj": "qkv"}


_STAGE_BY_ROLE = {"attn_in": 0, "attn_latent": 0, "cross_attn_in": 0, "attn_out": 1, "cross_attn_out": 1,
                  "ffn_in": 2, "expert_ffn_in": 2, "shared_ffn_in": 2, "router": 2, "ffn_out": 3,
                  "expert_ffn_out": 3, "shared_ffn_out": 3}


def stage(lin: Linear) -> int:
    """0 attention input, 1 attention output, 2 MLP input, 3 MLP output.

    From the Linear's role (generated cards: `cardgen.role_of`), else its name (hand-written cards); a Linear
    neither names (a role "other") counts as an attention input, the earliest stage, so everything above it
    is taken to need gradients (never an under-count of backward work).
    """
    if lin.role in _STAGE_BY_ROLE:
        return _STAGE_BY_ROLE[lin.role]
    if lin.role == "param_lora":  # peft's ParamWrapper on a router or fused expert stack: the MoE MLP
        return 3 if lin.name.endswith("down_proj") else 2
    if lin.name in _STAGES:
        return _STAGES[lin.name]
    return _STAGE_BY_LEAF.get(lin.name.rsplit(".", 1)[-1], 0)


def _post_norm(card: ModelCard) -> bool:
    """Blocks whose norms follow the sublayers (BERT/RoBERTa, OPT-350m) rather than precede them."""
    return card.encoder or (card.model_type == "opt" and not card.final_norm)


@dataclass(frozen=True)
class GradFlow:
    """Where backward runs: blocks ≥ `first` have a backward; in block `first` the input of stage k needs a
    gradient iff `stage_rg[k]`; in the blocks above, every input does."""

    first: int
    stage_rg: tuple[bool, bool, bool, bool]
    before_rg: bool  # inputs of Linears before the blocks (OPT's project_in) need gradients


_ALL = (True, True, True, True)


def grad_flow(card: ModelCard, plan: Plan) -> GradFlow:
    """Which Linear inputs require grad, from the lowest trainable parameter upward (no torch)."""
    if plan.method == "full":
        return GradFlow(0, _ALL, True)
    if plan.grad_checkpointing:  # enable_input_require_grads: the embedding output requires grad
        return GradFlow(0, _ALL, True)
    if plan.method == "top":
        return GradFlow(card.n_layers - plan.top_k, (False, True, True, True) if _post_norm(card) else _ALL, False)
    if plan.method == "adapter":  # every norm trains (Houlsby); post-norm OPT's first trainable piece follows o
        opt_post = card.model_type == "opt" and not card.final_norm
        return GradFlow(0, (False, False, True, True) if opt_post else _ALL, False)
    targets = lora_targets(card, plan.targets)
    if any(not in_block and "project_in" in lin.name for lin, in_block, _ in targets):
        return GradFlow(0, _ALL, False)
    stages = {stage(lin) for lin, in_block, _ in targets if in_block}
    if not stages:  # targets only in blocks outside the repeated one (DeepSeek-V2's MoE layers): the lowest
        layers = [(int(m.group(1)), lin) for lin, in_block, _ in targets if (m := _LAYER.search(lin.name))]
        low = min((i for i, _ in layers if i < card.n_layers), default=card.n_layers)
        if low == card.n_layers:
            return GradFlow(card.n_layers, _ALL, False)
        stages = {stage(lin) for i, lin in layers if i == low}
        return GradFlow(low, tuple(any(s < k for s in stages) for k in range(4)), False)
    return GradFlow(0, tuple(any(s < k for s in stages) for k in range(4)), False)


# ---------------------------------------------------------------- FLOPs


@dataclass(frozen=True)
class StepFlops:
    """Matmul FLOPs of one training step (T = b·s tokens) by kind. `matmul` is what a trace of mm/addmm/bmm
    counts with fused attention; eager attention's bmm are in `attention` as well."""

    tokens: int
    forward: int  # Linears, LoRA/adapter products and the head in the forward
    input_grad: int  # dX products
    weight_grad: int  # dW products
    recompute: int  # checkpoint recomputation of the blocks' Linears and LoRA/adapter products
    attention_forward: int  # QKᵀ and P·V in the forward
    attention_backward: int  # their gradients (flash: with its recomputation of QKᵀ)
    attention_recompute: int  # attention forward again under checkpointing
    small: int  # the part of forward/input_grad/weight_grad/recompute from LoRA and adapter products

    @property
    def matmul(self) -> int:
        return self.forward + self.input_grad + self.weight_grad + self.recompute

    @property
    def attention(self) -> int:
        return self.attention_forward + self.attention_backward + self.attention_recompute

    @property
    def total(self) -> int:
        return self.matmul + self.attention

    @property
    def per_token(self) -> float:
        return self.total / self.tokens


@dataclass(frozen=True)
class _Pass:
    """One GEMM shape of the step: `count` products of (T×k)·(k×n) with a weight of k·n elements."""

    k: int
    n: int
    count: int
    small: bool  # LoRA / adapter product
    kind: str  # forward | input_grad | weight_grad | recompute
    fixed: bool = False  # 2·k·n·count FLOPs per step, not per token (peft's merged expert stacks)
    experts: int = 0  # E: one grouped GEMM over a stack of E experts' (k×n) weights, k products per token


def _block_passes(card: ModelCard, plan: Plan, stack: Stack) -> list[_Pass]:
    """Every GEMM of the step (per shape, with multiplicity) except attention's."""
    lay = layout(card)
    flow = grad_flow(card, plan)
    L = card.n_layers
    n_bwd = L - flow.first  # blocks with a backward
    n_above = max(n_bwd - 1, 0)  # blocks above the lowest one: every input requires grad
    low = n_bwd > 0
    full = plan.method == "full"
    lora = {lin.name: in_block for lin, in_block, _ in lora_targets(card, plan.targets)} if plan.uses_lora else {}
    r, m = plan.r, plan.adapter_size
    ck = plan.grad_checkpointing
    out: list[_Pass] = []

    def add(k: int, n: int, count: int, small: bool, kind: str) -> None:
        if count > 0:
            out.append(_Pass(k, n, count, small, kind))

    # MLA (DeepSeek-V2): kv_b_proj reads kv_a_proj's normed output, which requires grad when kv_a_proj trains
    latent_trains = any(lora.get(x.name) and x.role == "attn_in" and "kv_a_proj" in x.name for x in lay.block_linears)
    last = lay.block_linears[-1]
    early_stop = ck and not stack.reentrant and not _saves_after_last(card)
    skip_last = early_stop and not card.moe  # a MoE block ends in its MLP, not in the repeated block's Linears
    for lin in lay.block_linears:
        s = stage(lin)
        rg_low = low and (flow.stage_rg[s] or (lin.role == "attn_latent" and latent_trains))
        n_dx = n_above + (1 if rg_low else 0)
        trainable_w = L if full else (plan.top_k if plan.method == "top" else 0)
        has_lora = lin.name in lora and lora[lin.name]
        has_adapter = plan.method == "adapter" and (s == 3 or (s == 1 and plan.adapter_placement == "houlsby"))
        add(lin.d_in, lin.d_out, L, False, "forward")
        add(lin.d_out, lin.d_in, n_dx, False, "input_grad")
        add(lin.d_in, lin.d_out, trainable_w, False, "weight_grad")
        # recompute: every block with a backward; early stop skips the block's final product
        final_is_base = lin is last and not has_lora and not has_adapter
        add(lin.d_in, lin.d_out, n_bwd if ck and not (skip_last and final_is_base) else 0, False, "recompute")
        if has_lora:
            add(lin.d_in, r, L, True, "forward")
            add(r, lin.d_out, L, True, "forward")
            add(lin.d_in, r, L, True, "weight_grad")
            add(r, lin.d_out, L, True, "weight_grad")
            add(lin.d_out, r, n_bwd, True, "input_grad")  # through B: A's output gradient, always needed
            add(r, lin.d_in, n_dx, True, "input_grad")  # through A
            if ck:
                add(lin.d_in, r, n_bwd, True, "recompute")
                add(r, lin.d_out, n_bwd if not (skip_last and lin is last) else 0, True, "recompute")
        if has_adapter:
            d = lin.d_out
            # the adapter's input (the sublayer output) requires grad iff the Linear's input does
            add(d, m, L, True, "forward")
            add(m, d, L, True, "forward")
            add(d, m, L, True, "weight_grad")
            add(m, d, L, True, "weight_grad")
            add(d, m, n_bwd, True, "input_grad")  # through up
            add(m, d, n_dx, True, "input_grad")  # through down
            if ck:
                add(d, m, n_bwd, True, "recompute")
                add(m, d, n_bwd if not (skip_last and lin is last) else 0, True, "recompute")
    layered = _layered_other_linears(card)
    lay_role = {x.name: x.role for x in lay.other_linears}
    for lin in lay.other_linears:
        if lin.name in layered:
            i = layered[lin.name]
            shared_in = any(lora.get(x) is False and j == i and lay_role[x] == "shared_ffn_in"
                            for x, j in layered.items())
            out += _layer_linear_passes(lin, i, card, plan, flow, lora.get(lin.name) is False,
                                        early_stop and lin.role in _LAYER_LAST, shared_in)
            continue
        before = "project_in" in lin.name
        rg = flow.before_rg if before else True
        add(lin.d_in, lin.d_out, 1, False, "forward")
        add(lin.d_out, lin.d_in, 1 if rg else 0, False, "input_grad")
        add(lin.d_in, lin.d_out, 1 if full else 0, False, "weight_grad")
        if lin.name in lora and not lora[lin.name]:
            for k, n in ((lin.d_in, r), (r, lin.d_out)):
                add(k, n, 1, True, "forward")
                add(k, n, 1, True, "weight_grad")
            add(lin.d_out, r, 1, True, "input_grad")
            add(r, lin.d_in, 1 if rg else 0, True, "input_grad")
    out += moe_passes(card, plan, flow)
    # the output head (tied or not): its dW only when the embedding/head trains
    add(lay.head_cols, lay.head_rows, 1, False, "forward")
    add(lay.head_rows, lay.head_cols, 1, False, "input_grad")
    add(lay.head_cols, lay.head_rows, 1 if full else 0, False, "weight_grad")
    return out


_LAYER_LAST = frozenset({"ffn_out", "shared_ffn_out"})  # a layer's final product (DeepSeek-V2: shared experts last)


def _layered_other_linears(card: ModelCard) -> dict[str, int]:
    """Linears outside the repeated block that belong to one block (DeepSeek-V2's dense first MLPs and shared
    experts, named model.layers.i.…) of a MoE card: {name: i}, blocks below n_layers only."""
    if not card.moe:
        return {}
    out = {}
    for lin in layout(card).other_linears:
        m = _LAYER.search(lin.name)
        if m and int(m.group(1)) < card.n_layers:
            out[lin.name] = int(m.group(1))
    return out


def _input_grads(i: int, s: int, card: ModelCard, flow: GradFlow, branch_trains: bool | None = None) -> int:
    """1 when the input of a stage-s Linear of block i requires grad, else 0. `branch_trains`, for an MLP output
    Linear of a MoE block (routed or shared experts, parallel branches of one stage): whether its own branch's
    input Linears train, which with the MLP input decides it (a trained router or other branch does not)."""
    if i != flow.first:
        return int(i > flow.first)
    if branch_trains is not None and s == 3:
        return int(flow.stage_rg[2] or branch_trains)
    return int(i < card.n_layers and flow.stage_rg[s])


def _trains(i: int, card: ModelCard, plan: Plan) -> int:
    """1 when block i's own weights train (full; top-k: the top k blocks)."""
    return int(plan.method == "full" or (plan.method == "top" and i >= card.n_layers - plan.top_k))


def _layer_linear_passes(lin: Linear, i: int, card: ModelCard, plan: Plan, flow: GradFlow, has_lora: bool,
                         final: bool, branch_trains: bool = False) -> list[_Pass]:
    """The GEMMs of a Linear of block i that lies outside the repeated block, by the block rules: a backward
    only from block flow.first up; `final`: the layer's last product, not re-run by non-reentrant early stop."""
    out: list[_Pass] = []
    branch = branch_trains if lin.role == "shared_ffn_out" else None
    bwd, dx, r = int(i >= flow.first), _input_grads(i, stage(lin), card, flow, branch), plan.r
    ck = plan.grad_checkpointing

    def add(k: int, n: int, count: int, small: bool, kind: str) -> None:
        if count > 0:
            out.append(_Pass(k, n, count, small, kind))

    add(lin.d_in, lin.d_out, 1, False, "forward")
    add(lin.d_out, lin.d_in, dx, False, "input_grad")
    add(lin.d_in, lin.d_out, _trains(i, card, plan), False, "weight_grad")
    add(lin.d_in, lin.d_out, bwd * ck * (not (final and not has_lora)), False, "recompute")
    if has_lora:
        for k, n in ((lin.d_in, r), (r, lin.d_out)):
            add(k, n, 1, True, "forward")
            add(k, n, 1, True, "weight_grad")
        add(lin.d_out, r, bwd, True, "input_grad")
        add(r, lin.d_in, dx, True, "input_grad")
        add(lin.d_in, r, bwd * ck, True, "recompute")
        add(r, lin.d_out, bwd * ck * (not final), True, "recompute")
    return out


def moe_blocks(card: ModelCard) -> tuple[int, ...]:
    """Indices of the blocks whose MLP is the routed experts: every block when the repeated block holds them,
    else the layers of the expert Params outside it (DeepSeek-V2: all but first_k_dense_replace)."""
    if not card.moe:
        return ()
    lay = layout(card)
    if any(p.expert for p in lay.block_params):
        return tuple(range(card.n_layers))
    idx = {int(m.group(1)) for p in lay.other_params if p.expert and (m := _LAYER.search(p.name))}
    return tuple(sorted(i for i in idx if i < card.n_layers))


def moe_passes(card: ModelCard, plan: Plan, flow: GradFlow) -> list[_Pass]:
    """The router's and the routed experts' GEMMs of every MoE block (module docstring, "experts"), with peft's
    merged-stack products (ParamWrapper) as `fixed` passes. Shapes from the card's Params (planning/moe.py)."""
    from peftplan.planning import moe

    blocks = moe_blocks(card)
    if not blocks:
        return []
    k_top, r, ck = card.experts_per_token, plan.r, plan.grad_checkpointing
    params = [p for p in moe.moe_block_params(card) if (p.role == "router" and len(p.shape) == 2)
              or (p.expert and len(p.shape) == 3)]
    wrapped = {p.name for p in moe.lora_wrapped(card, plan)}
    out: list[_Pass] = []

    def add(k: int, n: int, count: int, small: bool, kind: str, fixed: bool = False, experts: int = 0) -> None:
        if count > 0:
            out.append(_Pass(k, n, count, small, kind, fixed, experts))

    for p in params:
        s = 3 if p.name.endswith("down_proj") else 2
        if p.role == "router":
            E, d = p.shape
            k, n, per_token, grouped = d, E, 1, 0
        else:
            E, a, b = p.shape
            k, n, per_token, grouped = a, b, k_top, E
        wrap = p.name in wrapped
        bwd = sum(1 for i in blocks if i >= flow.first)
        up = any(q.name in wrapped and q.expert and not q.name.endswith("down_proj") for q in params)
        # down_proj's input: from gate_up alone (the router's output joins after it)
        dx = sum(_input_grads(i, s, card, flow, bool(up or _trains(i, card, plan)) if s == 3 else None)
                 for i in blocks)
        add(k, n, per_token * len(blocks), False, "forward", experts=grouped)
        add(n, k, per_token * dx, False, "input_grad", experts=grouped)
        add(k, n, per_token * sum(max(_trains(i, card, plan), int(wrap and i >= flow.first)) for i in blocks),
            False, "weight_grad", experts=grouped)
        add(k, n, per_token * bwd * ck, False, "recompute", experts=grouped)
        if not wrap:
            continue
        if p.role == "router":  # _LoraParameterProxy: delta = B·A (E×r·r×d) per forward, dA and dB in backward
            add(E * r, d, len(blocks), True, "forward", True)
            add(E * r, d, 2 * bwd, True, "weight_grad", True)
            add(E * r, d, bwd * ck, True, "recompute", True)
        else:  # _LoraFactorsProxy: baddbmm(W, lhs (E, a, R), rhs (E, R, b)), twice per forward; two bmm back
            R = r * (2 if p.name.endswith("gate_up_proj") else 1)
            add(E * a * R, b, 2 * len(blocks), True, "forward", True)
            add(E * a * R, b, 2 * bwd, True, "weight_grad", True)
            add(E * a * R, b, 2 * bwd * ck, True, "recompute", True)
    return out


def _saves_after_last(card: ModelCard) -> bool:
    """A norm or an active dropout (its mask) after the block's final product saves a tensor for backward, so
    non-reentrant recomputation reaches and re-runs that product."""
    return _post_norm(card) or card.sandwich_norms or hidden_dropout(card) > 0


def hidden_dropout(card: ModelCard) -> float:
    """The sublayer-output dropout the built model runs: a config.json override in `card.hf` wins (build.py
    applies it last)."""
    for key in ("resid_pdrop", "dropout", "hidden_dropout_prob"):
        if key in card.hf:
            return float(card.hf[key])
    return card.hidden_dropout


def attention_flops(card: ModelCard, plan: Plan, sf: "ShapeFree") -> tuple[int, int, int]:
    """(forward, backward, recompute) FLOPs of QKᵀ and P·V over all blocks."""
    b, s, L = plan.batch_size, plan.seq_len, card.n_layers
    fused = plan.attention != "eager"
    pairs = s * (s + 1) // 2 if (fused and not card.encoder) else s * s  # query-key pairs per sequence per head
    one = 2 * b * pairs * card.d_q  # one of the two products, one block
    fwd = 2 * one * L
    if sf.n_bwd <= 0:
        return fwd, 0, 0
    bwd = one * (5 * sf.n_bwd if fused else 4 * (sf.n_bwd - 1) + sf.eager_low)
    rec = 2 * one * sf.n_bwd if plan.grad_checkpointing else 0
    return fwd, bwd, rec


def _qkv_rg(card: ModelCard, plan: Plan, flow: GradFlow) -> tuple[bool, bool, bool]:
    """Whether q, k and v require grad in the lowest block with a backward."""
    rg = {"q": flow.stage_rg[0], "k": flow.stage_rg[0], "v": flow.stage_rg[0]}
    trained = plan.method in ("full", "top")
    names = {lin.name for lin, in_block, _ in lora_targets(card, plan.targets) if in_block} if plan.uses_lora else set()
    for lin in layout(card).block_linears:
        role = _ROLE_BY_LEAF.get(lin.name.rsplit(".", 1)[-1])
        if role and (trained or lin.name in names):
            for x in ("q", "k", "v") if role == "qkv" else (role,):
                rg[x] = True
    return rg["q"], rg["k"], rg["v"]


@dataclass(frozen=True)
class ShapeFree:
    """What does not depend on b and s, computed once per card, plan (less its shape) and stack."""

    per_token: tuple[int, int, int, int, int]  # forward, input_grad, weight_grad, recompute, small: FLOPs / token
    fixed: tuple[int, int, int, int, int]  # the same kinds, FLOPs per step that do not scale with b·s
    groups: tuple[tuple[int, int, bool, int], ...]  # (k, n, small, count) of every GEMM shape
    expert_groups: tuple[tuple[int, int, int, int], ...]  # (k, n, E, count): grouped GEMMs over E experts' k×n
    n_bwd: int  # blocks with a backward
    eager_low: int  # eager attention products the lowest such block runs in backward (dP, dV, dQ, dK as needed)


def _shape_free_of(card: ModelCard, plan: Plan, stack: Stack) -> ShapeFree:
    kinds = ("forward", "input_grad", "weight_grad", "recompute")
    sums, fixed = dict.fromkeys(kinds, 0), dict.fromkeys((*kinds, "small"), 0)
    small, groups, expert_groups = 0, {}, {}
    for p in _block_passes(card, plan, stack):
        f = 2 * p.k * p.n * p.count
        if p.fixed:
            fixed[p.kind] += f
            fixed["small"] += f if p.small else 0
            continue
        sums[p.kind] += f
        small += f if p.small else 0
        if p.experts:
            expert_groups[(p.k, p.n, p.experts)] = expert_groups.get((p.k, p.n, p.experts), 0) + p.count
        else:
            groups[(p.k, p.n, p.small)] = groups.get((p.k, p.n, p.small), 0) + p.count
    flow = grad_flow(card, plan)
    q, k, v = _qkv_rg(card, plan, flow)
    return ShapeFree(per_token=(*(sums[x] for x in kinds), small), fixed=tuple(fixed.values()),
                      groups=tuple((k_, n_, sm, c) for (k_, n_, sm), c in groups.items()),
                      expert_groups=tuple((k_, n_, E, c) for (k_, n_, E), c in expert_groups.items()),
                      n_bwd=card.n_layers - flow.first, eager_low=int(q or k) + int(v) + int(q) + int(k))


_SHAPE = ("batch_size", "seq_len")
# every Plan field but the step's shape, read in one C call: the memo key of the shape-free work
shape_free_key = attrgetter(*(f.name for f in fields(Plan) if f.name not in _SHAPE))
_SHAPE_FREE: dict[tuple, ShapeFree] = {}


def shape_free(card: ModelCard, plan: Plan, stack: Stack) -> ShapeFree:
    """`_shape_free_of` the plan at b = s = 1, memoised on the plan's other fields (no Plan rebuilt on a hit)."""
    key = (card, stack, shape_free_key(plan))
    sf = _SHAPE_FREE.get(key)
    if sf is None:
        if len(_SHAPE_FREE) > 16384:
            _SHAPE_FREE.clear()
        sf = _SHAPE_FREE[key] = _shape_free_of(card, plan.with_(batch_size=1, seq_len=1), stack)
    return sf


@lru_cache(maxsize=8192)
def step_flops(card: ModelCard, plan: Plan, stack: Stack = DEFAULT_STACK) -> StepFlops:
    """Matmul FLOPs of one training step of `plan` on `card`, by kind (see the module docstring for each term).

    Exact for peftplan's step (tests/test_timing.py holds it to the fake-tensor trace's mm/addmm/bmm within 1%).
    Raises PlanError for LoRA targets that match nothing.
    """
    T = plan.tokens
    sf = shape_free(card, plan, stack)
    fwd, dx, dw, rec, small = (T * x + c for x, c in zip(sf.per_token, sf.fixed))
    af, ab, ar = attention_flops(card, plan, sf)
    return StepFlops(tokens=T, forward=fwd, input_grad=dx, weight_grad=dw, recompute=rec, attention_forward=af,
                     attention_backward=ab, attention_recompute=ar, small=small)


def flops_per_token(card: ModelCard, plan: Plan, p: ParamCounts | None = None) -> float:
    """Training FLOPs per token of the plan (all matmuls and attention products of one step / b·s)."""
    return step_flops(card, plan).per_token


def matmul_params(card: ModelCard) -> int:
    """N: weights that take part in matmuls (block linears, other linears and the output head)."""
    lay = layout(card)
    blocks = card.n_layers * sum(x.weight_numel for x in lay.block_linears)
    return blocks + sum(x.weight_numel for x in lay.other_linears) + lay.head_rows * lay.head_cols
