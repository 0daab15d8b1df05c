"""Training FLOPs of one step, exact per plan and architecture, and a roofline step time and cost on a GPU card.

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
    checkpointing    each checkpointed block's forward runs again in backward (Chen et al. 2016), and transformers
                     makes the embedding output require grad (modeling_utils `_activation_checkpointing_enable`:
                     enable_input_require_grads), so every block computes input gradients. Non-reentrant
                     checkpointing (transformers ≥ 5 default) stops recomputing after the block's last saved
                     tensor (torch/utils/checkpoint.py, early stop): the block's final matmul is not re-run when
                     nothing after it saves a tensor (a residual add saves none); reentrant re-runs all of it.

Step time (`step_time`): a roofline per phase (Williams et al. 2009) instead of one utilisation.

    GEMMs            each Linear pass (forward, recompute, dX, dW) at max(FLOPs / (gemm·peak),
                     bytes / (bandwidth·BW)): compute-bound for large T, weight-read-bound for small T
    small matmuls    LoRA / adapter products (rank r or m) at the same roofline: memory-bound for usual ranks
    attention        attention FLOPs at attention·peak (fused kernels)
    memory-bound     norms, rotary, activations, residual adds, dropout, LoRA's scaling/adds/casts, the loss over the
                     vocabulary, QLoRA's dequantization of every NF4 weight on each use (forward, recompute,
                     backward), and the optimizer step over all trainable state, at bandwidth·BW
    per step         the sum (kernels of one stream run one after another)

The three efficiency constants live in `EFFICIENCY`, the one place they are set, with the rows they were fitted to.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from peftplan.planning.cards import ModelCard
from peftplan.planning.layout import Layout, Linear, layout
from peftplan.planning.memory import trainable_element_bytes
from peftplan.planning.params import NF4_BLOCK, ParamCounts, count, lora_targets
from peftplan.plan import Plan
from peftplan.results import Time

if TYPE_CHECKING:
    from peftplan.planning.gpus import GpuCard


# ---------------------------------------------------------------- efficiency constants (the one place)


@dataclass(frozen=True)
class Efficiency:
    """Achievable fractions of a card's datasheet rates."""

    gemm: float  # large bf16/fp16 GEMMs: fraction of the dense tensor-core peak
    attention: float  # fused (flash) attention forward + backward: fraction of the dense peak
    bandwidth: float  # memory-bound kernels (elementwise, reductions, dequantization, optimizer): fraction of DRAM BW


# gemm and bandwidth: fitted by `python benchmarks/published.py --fit` (least squares on log tokens/s, grid step
# 0.01) to the two FIT_ROWS of ../shared/published/measurements.jsonl only (fms-acceleration, A100-80GB, QLoRA
# with the fms plugin: Mistral-7B and Llama-2-70B, b 4 × s 4,096, checkpointing, flash-attention 2). Every
# other expressible throughput row checks them (benchmarks/published.py, README "Time and cost").
# attention: not fitted; FlashAttention-2 (Dao 2023, abstract and §4) reaches 50–73% of the A100's peak, the
# forward+backward pass at the lower end: 0.55.
FIT_ROWS = ("fms_mistral7b_qlora_fmsplugin_bs4", "fms_llama2_70b_qlora_fmsplugin_bs4")
EFFICIENCY = Efficiency(gemm=0.84, attention=0.55, bandwidth=0.63)


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


def stage(lin: Linear) -> int:
    """0 attention input, 1 attention output, 2 MLP input, 3 MLP output."""
    if lin.name in _STAGES:
        return _STAGES[lin.name]
    return _STAGE_BY_LEAF[lin.name.rsplit(".", 1)[-1]]


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
    if any(not in_block and "project_in" in lin.name for lin, in_block in targets):
        return GradFlow(0, _ALL, False)
    stages = {stage(lin) for lin, in_block in targets if in_block}
    if not stages:
        return GradFlow(card.n_layers, _ALL, False)
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


def _block_passes(card: ModelCard, plan: Plan, stack: Stack) -> list[_Pass]:
    """Every GEMM of the step (per shape, with multiplicity) except attention's."""
    lay = layout(card)
    flow = grad_flow(card, plan)
    L = card.n_layers
    n_bwd = L - flow.first  # blocks with a backward
    n_above = max(n_bwd - 1, 0)  # blocks above the lowest one: every input requires grad
    low = n_bwd > 0
    full = plan.method == "full"
    lora = {lin.name: in_block for lin, in_block in lora_targets(card, plan.targets)} if plan.uses_lora else {}
    r, m = plan.r, plan.adapter_size
    ck = plan.grad_checkpointing
    out: list[_Pass] = []

    def add(k: int, n: int, count: int, small: bool, kind: str) -> None:
        if count > 0:
            out.append(_Pass(k, n, count, small, kind))

    last = lay.block_linears[-1]
    skip_last = ck and not stack.reentrant and not _saves_after_last(card)
    for lin in lay.block_linears:
        s = stage(lin)
        rg_low = low and flow.stage_rg[s]
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
    for lin in lay.other_linears:
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
    # the output head (tied or not): its dW only when the embedding/head trains
    add(lay.head_cols, lay.head_rows, 1, False, "forward")
    add(lay.head_rows, lay.head_cols, 1, False, "input_grad")
    add(lay.head_cols, lay.head_rows, 1 if full else 0, False, "weight_grad")
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


def _attention_flops(card: ModelCard, plan: Plan, sf: "_ShapeFree") -> tuple[int, int, int]:
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
    names = {lin.name for lin, in_block in lora_targets(card, plan.targets) if in_block} if plan.uses_lora else set()
    for lin in layout(card).block_linears:
        role = _ROLE_BY_LEAF.get(lin.name.rsplit(".", 1)[-1])
        if role and (trained or lin.name in names):
            for x in ("q", "k", "v") if role == "qkv" else (role,):
                rg[x] = True
    return rg["q"], rg["k"], rg["v"]


@dataclass(frozen=True)
class _ShapeFree:
    """What does not depend on b and s, computed once per card, plan (less its shape) and stack."""

    per_token: tuple[int, int, int, int, int]  # forward, input_grad, weight_grad, recompute, small: FLOPs / token
    groups: tuple[tuple[int, int, bool, int], ...]  # (k, n, small, count) of every GEMM shape
    n_bwd: int  # blocks with a backward
    eager_low: int  # eager attention products the lowest such block runs in backward (dP, dV, dQ, dK as needed)
    elementwise: float  # memory-bound bytes per token
    dequantize: float  # bytes per step
    optimizer: float  # bytes per step


def _shape_free_of(card: ModelCard, plan: Plan, stack: Stack) -> _ShapeFree:
    kinds = ("forward", "input_grad", "weight_grad", "recompute")
    sums = dict.fromkeys(kinds, 0)
    small, groups = 0, {}
    for p in _block_passes(card, plan, stack):
        f = 2 * p.k * p.n * p.count
        sums[p.kind] += f
        small += f if p.small else 0
        groups[(p.k, p.n, p.small)] = groups.get((p.k, p.n, p.small), 0) + p.count
    flow = grad_flow(card, plan)
    q, k, v = _qkv_rg(card, plan, flow)
    tr = _traffic(card, plan, stack, flow)
    return _ShapeFree(per_token=(*(sums[x] for x in kinds), small),
                      groups=tuple((k_, n_, sm, c) for (k_, n_, sm), c in groups.items()),
                      n_bwd=card.n_layers - flow.first, eager_low=int(q or k) + int(v) + int(q) + int(k),
                      elementwise=tr[0], dequantize=tr[1], optimizer=tr[2])


_SHAPE = ("batch_size", "seq_len")
_SHAPE_FREE: dict[tuple, _ShapeFree] = {}


def _shape_free(card: ModelCard, plan: Plan, stack: Stack) -> _ShapeFree:
    """`_shape_free_of` the plan at b = s = 1, memoised on the plan's other fields (no Plan rebuilt on a hit)."""
    key = (card, stack, *(v for k, v in plan.__dict__.items() if k not in _SHAPE))
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
    sf = _shape_free(card, plan, stack)
    fwd, dx, dw, rec, small = (T * x for x in sf.per_token)
    af, ab, ar = _attention_flops(card, plan, sf)
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


# ---------------------------------------------------------------- memory traffic


FP32 = 4


def _act_bytes(plan: Plan) -> tuple[int, int]:
    """(e, e_stream): element bytes of activations and of the residual stream (fp32 after QLoRA's k-bit
    preparation, which upcasts the embeddings and norms: see memory.act_bytes)."""
    e = plan.bytes_per_element
    return e, FP32 if plan.method == "qlora" and plan.kbit_prep else e


def _adapter_bytes(plan: Plan, stack: Stack) -> int:
    """Element bytes of the LoRA/adapter weights and products."""
    if stack.adapter_dtype == "fp32":
        return FP32
    return trainable_element_bytes(plan) if plan.uses_lora else plan.bytes_per_element


def _norm_bytes(card: ModelCard, es: int) -> int:
    """Bytes per element of d one norm moves in the forward. RMSNorm in transformers is unfused: x→fp32,
    pow, mean, ·rsqrt, →dtype, ·γ (modeling_llama.LlamaRMSNorm); LayerNorm is one fused kernel (read, write)."""
    if card.norm == "rmsnorm":
        return (es + FP32) + 2 * FP32 + FP32 + 2 * FP32 + (FP32 + es) + 3 * es
    return 2 * es


def _block_elementwise(card: ModelCard, plan: Plan, stack: Stack) -> float:
    """Bytes per token one block's memory-bound kernels move in the forward."""
    e, es = _act_bytes(plan)
    lay = layout(card)
    d, L = card.d_model, card.n_layers
    total = len(lay.block_norms) * _norm_bytes(card, es) * d
    total += 2 * 3 * es * d  # two residual adds: read two, write one
    if card.positions == "rotary":  # q·cos + rotate_half(q)·sin on q and k (slices, cat, two muls, an add)
        total += 12 * e * (card.d_q + card.d_kv)
    total += 2 * e * card.d_q  # attention output back to (b, s, h·d_h): one copy
    total += (5 if card.gated_mlp else 2) * e * card.d_ff  # act(gate)·up or act(x)
    if hidden_dropout(card) > 0:
        total += 2 * (2 * e + 1) * d
    if es != e:  # the fp32 stream is cast to the compute dtype at every Linear4bit input
        total += sum(lin.d_in for lin in lay.block_linears) * (es + e)
    ea = _adapter_bytes(plan, stack)
    if plan.uses_lora:
        for lin, in_block in lora_targets(card, plan.targets):
            if not in_block:
                continue
            site = lin.d_in * ea  # A reads x
            if ea != e:
                site += lin.d_in * (e + ea) + lin.d_out * (ea + e)  # x to the adapter dtype; the sum back
            if plan.dropout > 0:
                site += lin.d_in * (2 * ea + 1)
            site += lin.d_out * (ea + 2 * ea + (e + ea + max(e, ea)))  # B's output, ·α/r, added to W0·x
            total += site
    if plan.method == "adapter":
        n = 2 if plan.adapter_placement == "houlsby" else 1
        total += n * 5 * e * d  # down reads h, up writes, the adapter's residual add
    return float(total)


def _loss_bytes(card: ModelCard, plan: Plan) -> float:
    """Bytes per token of the logits and the loss: logits written, upcast to fp32, log-softmax, its gradient and
    the cast back (transformers' ForCausalLMLoss upcasts the logits; the masked-LM loss does not)."""
    e = plan.bytes_per_element
    up = 0 if card.encoder or e == FP32 else e + FP32
    return card.vocab_size * (e + up + 2 * FP32 + 3 * FP32 + e)


def _optimizer_passes(plan: Plan) -> float:
    """Parameter-sized element passes of one optimizer step (reads + writes), per trainable parameter, in units
    of the parameter's bytes. torch AdamW foreach (torch/optim/adamw.py _multi_tensor_adamw): weight decay (2),
    lerp of m (3), v·β2 (2), addcmul (3), sqrt (2), ÷ bias correction (2), + ε (2), addcdiv into p (4) = 20."""
    return {"adamw": 20.0, "paged-adamw": 20.0, "adamw8bit": 5.0, "paged-adamw8bit": 5.0, "sgd": 3.0,
            "sgd-momentum": 6.0}[plan.optimizer]


@dataclass(frozen=True)
class Traffic:
    """Bytes moved by the memory-bound work of one step."""

    elementwise: float  # norms, rotary, activations, residuals, dropout, LoRA/adapter glue, loss
    dequantize: float  # QLoRA: NF4 → compute dtype, every quantized weight on every use
    optimizer: float


def traffic(card: ModelCard, plan: Plan, stack: Stack = DEFAULT_STACK) -> Traffic:
    """Memory-bound bytes of one step. Backward of an elementwise op reads its saved input(s) and the incoming
    gradient and writes the outgoing one: taken as twice its forward; recomputation repeats the forward."""
    sf = _shape_free(card, plan, stack)
    return Traffic(elementwise=plan.tokens * sf.elementwise, dequantize=sf.dequantize, optimizer=sf.optimizer)


def _traffic(card: ModelCard, plan: Plan, stack: Stack, flow: GradFlow) -> tuple[float, float, float]:
    """(elementwise bytes per token, dequantization bytes per step, optimizer bytes per step)."""
    L = card.n_layers
    n_bwd = L - flow.first
    passes = L + 2 * n_bwd + (n_bwd if plan.grad_checkpointing else 0)
    elementwise = _block_elementwise(card, plan, stack) * passes + _loss_bytes(card, plan)
    dequant = 0.0
    if plan.method == "qlora":
        # read 4-bit codes and absmax, write the bf16/fp16 weight (bitsandbytes dequantize_4bit)
        per_weight = 0.5 + (1.0 if plan.double_quant else 4.0) / NF4_BLOCK + plan.bytes_per_element
        uses = 0
        for lin in layout(card).block_linears:
            n_dx = max(n_bwd - 1, 0) + (1 if n_bwd and flow.stage_rg[stage(lin)] else 0)
            uses += lin.weight_numel * (L + n_dx + (n_bwd if plan.grad_checkpointing else 0))
        dequant = uses * per_weight
    ps = trainable_element_bytes(plan) if plan.uses_lora else plan.bytes_per_element
    optimizer = count(card, plan).trainable * ps * _optimizer_passes(plan)
    return float(elementwise), float(dequant), float(optimizer)


# ---------------------------------------------------------------- roofline


@dataclass(frozen=True)
class PhaseSeconds:
    gemm: float
    small: float
    attention: float
    memory: float  # elementwise + dequantize
    optimizer: float

    @property
    def total(self) -> float:
        return self.gemm + self.small + self.attention + self.memory + self.optimizer


def phase_seconds(card: ModelCard, plan: Plan, peak_tflops: float, bandwidth_gbs: float,
                  stack: Stack = DEFAULT_STACK, eff: Efficiency = EFFICIENCY,
                  small_peak_tflops: float | None = None) -> PhaseSeconds:
    """Seconds of one step by kind of work on a card with `peak_tflops` (dense, the plan's dtype) and
    `bandwidth_gbs` (GB/s). `small_peak_tflops`: rate of the LoRA/adapter products (fp32 adapters without
    autocast run at the card's fp32 rate); default the dense peak."""
    T = plan.tokens
    P, BW = peak_tflops * 1e12, bandwidth_gbs * 1e9
    Ps = P if small_peak_tflops is None else small_peak_tflops * 1e12
    e = plan.bytes_per_element
    ea = _adapter_bytes(plan, stack)
    sf = _shape_free(card, plan, stack)
    rate, rate_small, bw = eff.gemm * P, eff.gemm * Ps, eff.bandwidth * BW
    gemm = small = 0.0
    for k, n, is_small, n_calls in sf.groups:
        w = ea if is_small else e
        t = max(2.0 * T * k * n / (rate_small if is_small else rate), (k * n + T * (k + n)) * w / bw) * n_calls
        if is_small:
            small += t
        else:
            gemm += t
    af, ab, ar = _attention_flops(card, plan, sf)
    attn = (af + ab + ar) / (eff.attention * P)
    if plan.attention == "eager":  # scores and probabilities are materialised: b·h·s² elements, several passes
        attn = (af + ab + ar) / rate + _eager_bytes(card, plan) / bw
    return PhaseSeconds(gemm=gemm, small=small, attention=attn, memory=(T * sf.elementwise + sf.dequantize) / bw,
                        optimizer=sf.optimizer / bw)


def _eager_bytes(card: ModelCard, plan: Plan) -> float:
    """Eager attention's score traffic: scores written, softmax in fp32 read and written, probabilities cast,
    read by P·V; backward about twice that."""
    e = plan.bytes_per_element
    elems = plan.batch_size * card.n_heads * plan.seq_len * plan.seq_len * card.n_layers
    return 3.0 * elems * (e + 2 * FP32 + FP32 + e + e)


@lru_cache(maxsize=16384)
def step_time(card: ModelCard, plan: Plan, gpu: "GpuCard", tokens: int = 0, stack: Stack = DEFAULT_STACK,
              peak_tflops: float | None = None) -> Time:
    """Roofline step time and tokens/s of the plan on a GPU card and, for a data budget of `tokens`, GPU-hours
    and cost (hours × the card's indicative price). `peak_tflops`: the dense rate to use (default: the card's
    rate for plan.dtype; api.estimate passes the fp32 rate where bf16 is emulated).

    `utilisation` in the result is the model-FLOPs utilisation this time implies (step FLOPs / time / peak).
    Raises PlanError for a dtype the card has no rate for.
    """
    if peak_tflops is None:
        from peftplan.planning.gpus import peak_tflops as rate

        peak_tflops = rate(gpu, plan.dtype)
    total, ph = _time_core(card, plan, peak_tflops, gpu.mem_bandwidth_gbs, stack, gpu.fp32_tflops)
    seconds = ph.total
    tokens_per_s = plan.tokens / seconds
    hours = tokens / tokens_per_s / 3600.0 if tokens else 0.0
    return Time(
        gpu=gpu.name, flops_per_token=total / plan.tokens, flops_per_step=float(total),
        utilisation=total / seconds / (peak_tflops * 1e12), peak_tflops=peak_tflops,
        step_time_s=seconds, tokens_per_s=tokens_per_s, tokens=tokens, gpu_hours=hours,
        cost_usd=hours * gpu.price_per_hour_usd, mem_bandwidth_gbs=gpu.mem_bandwidth_gbs, gemm_s=ph.gemm + ph.small,
        attention_s=ph.attention, memory_s=ph.memory, optimizer_s=ph.optimizer,
    )


def _time_core(card: ModelCard, plan: Plan, peak_tflops: float, bandwidth_gbs: float, stack: Stack,
               fp32_tflops: float | None) -> tuple[int, PhaseSeconds]:
    small_peak = fp32_tflops if stack.adapter_dtype == "fp32" and plan.dtype != "fp32" else None
    return (step_flops(card, plan, stack).total,
            phase_seconds(card, plan, peak_tflops, bandwidth_gbs, stack, small_peak_tflops=small_peak))
