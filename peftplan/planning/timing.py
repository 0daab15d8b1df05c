"""Roofline step time and cost of a plan on a GPU card, from the exact step FLOPs (planning/flops.py).

Step time (`step_time`): a roofline per phase (Williams et al. 2009) instead of one utilisation.

    GEMMs            each Linear pass (forward, recompute, dX, dW) at max(FLOPs / (gemm·peak),
                     bytes / (bandwidth·BW)): compute-bound for large T, weight-read-bound for small T
    small matmuls    LoRA / adapter products (rank r or m) at the same roofline: memory-bound for usual ranks
    attention        attention FLOPs at attention·peak (fused kernels)
    memory-bound     norms, rotary, activations, residual adds, dropout, LoRA's scaling/adds/casts, the loss over the
                     vocabulary, QLoRA's dequantization of every NF4 weight on each use (forward, recompute,
                     backward), and the optimizer step over all trainable state, at bandwidth·BW
    per step         the sum (kernels of one stream run one after another)

The efficiency constants live in `EFFICIENCY`, the one place they are set: gemm and bandwidth fitted to the
published rows named in `FIT_ROWS` (the other rows check them), attention from FlashAttention-2's paper.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from peftplan.planning.cards import ModelCard
from peftplan.planning.flops import (  # noqa: F401  (re-exported for callers of the time model)
    DEFAULT_STACK, GradFlow, Stack, StepFlops, attention_flops, flops_per_token, grad_flow, hidden_dropout,
    matmul_params, shape_free, shape_free_key, stage, step_flops,
)
from peftplan.planning.layout import layout
from peftplan.planning.memory import trainable_element_bytes
from peftplan.planning.params import NF4_BLOCK, count, lora_targets
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
# other expressible throughput row checks them (benchmarks/published.py, README "Time vs published runs").
# attention: not fitted; FlashAttention-2 (Dao 2023, abstract and §4) reaches 50–73% of the A100's peak, the
# forward+backward pass at the lower end: 0.55.
FIT_ROWS = ("fms_mistral7b_qlora_fmsplugin_bs4", "fms_llama2_70b_qlora_fmsplugin_bs4")
EFFICIENCY = Efficiency(gemm=0.84, attention=0.55, bandwidth=0.63)


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


def _moe_elementwise(card: ModelCard, e: int) -> float:
    """Bytes per token a MoE block's memory-bound kernels move in the forward (transformers/integrations/moe.py
    `grouped_mm_experts_forward`), in place of a dense MLP's activation: the router's softmax over E in fp32 and
    its top-k; per (token, expert) pair, k per token: the gathered input (read, write d), act(gate)·up (5f), the
    routing-weight product (read d and the weight, write d in the weights' dtype w), the un-permuting gather
    (read, write d·w), then the sum over k (k reads, one write) and the cast back; shared experts (DeepSeek-V2):
    a gated MLP of width f_s and its add to the routed output."""
    from peftplan.planning import moe

    k, d, f, E = card.experts_per_token, card.d_model, card.expert_d_ff, card.n_experts
    w = max(moe.weights_bytes(card, e), e)
    router = E * (e + 3 * FP32) + k * 3 * FP32
    pairs = k * (2 * e * d + 5 * e * f + d * (e + w) + w + 2 * d * w)
    combine = (k + 1) * d * w + (d * (w + e) if w != e else 0)
    shared = moe._shared_linears(card, ("shared_ffn_in",))
    return router + pairs + combine + (5 * e * shared[0].d_out + 3 * e * d if shared else 0)


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
    if card.moe:
        total += _moe_elementwise(card, e)
    else:
        total += (5 if card.gated_mlp else 2) * e * card.d_ff  # act(gate)·up or act(x)
    if hidden_dropout(card) > 0:
        total += 2 * (2 * e + 1) * d
    if es != e:  # the fp32 stream is cast to the compute dtype at every Linear4bit input
        total += sum(lin.d_in for lin in lay.block_linears) * (es + e)
    ea = _adapter_bytes(plan, stack)
    if plan.uses_lora:
        for lin, in_block, _ in lora_targets(card, plan.targets):
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
    el, dq, opt = _traffic_shape_free(card, plan, stack)
    return Traffic(elementwise=plan.tokens * el, dequantize=dq, optimizer=opt)


_TRAFFIC: dict[tuple, tuple[float, float, float]] = {}


def _traffic_shape_free(card: ModelCard, plan: Plan, stack: Stack) -> tuple[float, float, float]:
    """`_traffic` memoised on everything but b and s."""
    key = (card, stack, shape_free_key(plan))
    got = _TRAFFIC.get(key)
    if got is None:
        if len(_TRAFFIC) > 16384:
            _TRAFFIC.clear()
        got = _TRAFFIC[key] = _traffic(card, plan, stack, grad_flow(card, plan))
    return got


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
    sf = shape_free(card, plan, stack)
    el, dq, opt = _traffic_shape_free(card, plan, stack)
    rate, rate_small, bw = eff.gemm * P, eff.gemm * Ps, eff.bandwidth * BW
    gemm = small = 0.0
    for k, n, is_small, n_calls in sf.groups:
        w = ea if is_small else e
        t = max(2.0 * T * k * n / (rate_small if is_small else rate), (k * n + T * (k + n)) * w / bw) * n_calls
        if is_small:
            small += t
        else:
            gemm += t
    # grouped GEMMs over E experts: S = k·T pair rows, the weights of the experts that get tokens read once
    S = card.experts_per_token * T if card.moe else 0
    for k, n, E, n_calls in sf.expert_groups:
        gemm += max(2.0 * S * k * n / rate, (min(E, S) * k * n + S * (k + n)) * e / bw) * n_calls \
            / card.experts_per_token
    small += sf.fixed[-1] / rate_small  # peft's merged expert stacks (batched products of whole stacks)
    gemm += (sum(sf.fixed[:4]) - sf.fixed[-1]) / rate
    af, ab, ar = attention_flops(card, plan, sf)
    attn = (af + ab + ar) / (eff.attention * P)
    if plan.attention == "eager":  # scores and probabilities are materialised: b·h·s² elements, several passes
        attn = (af + ab + ar) / rate + _eager_bytes(card, plan) / bw
    return PhaseSeconds(gemm=gemm, small=small, attention=attn, memory=(T * el + dq) / bw, optimizer=opt / bw)


def _eager_bytes(card: ModelCard, plan: Plan) -> float:
    """Eager attention's score traffic: scores written, softmax in fp32 read and written, probabilities cast,
    read by P·V; backward about twice that."""
    e = plan.bytes_per_element
    elems = plan.batch_size * card.n_heads * plan.seq_len * plan.seq_len * card.n_layers
    return 3.0 * elems * (e + 2 * FP32 + FP32 + e + e)


@lru_cache(maxsize=16384)
def stack_of(plan: Plan) -> Stack:
    """The Stack a Plan implies: its checkpointing kind, and peft's fp32 adapters over a 16-bit base without
    autocast (each targeted input cast to fp32 and the LoRA matmuls at the fp32 rate)."""
    fp32_adapters = (plan.uses_lora and getattr(plan, "adapter_dtype", None) == "fp32" and plan.dtype != "fp32"
                     and getattr(plan, "autocast", "none") == "none")
    return Stack(reentrant=bool(getattr(plan, "use_reentrant", False)), adapter_dtype="fp32" if fp32_adapters else None)


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
