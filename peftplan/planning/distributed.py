"""Per-GPU memory past one GPU: DDP, DeepSpeed ZeRO-1/2/3 and PyTorch FSDP2, with offload.

The single-GPU phases (`memory.phases`, computed for the per-GPU micro-batch) are split by what each engine
shards. Symbols: W = world size (`gpus`), S = ranks one copy is sharded over (W, or the GPUs of one node for
fsdp-hybrid), Ψ_t trainable parameters, e the weights' bytes per element. Frozen parameters are sharded like the
others under ZeRO-3/FSDP but have no gradients and no optimizer states — the PEFT case.

DDP (torch/nn/parallel/distributed.py, reducer.cpp): a full replica; the Reducer allocates flat bucket storage for
every trainable gradient at construction (`gradient_as_bucket_view=False`, the default and accelerate's): a second
copy of the gradients, live in every phase.

DeepSpeed 0.19 (runtime/zero/stage_1_and_2.py, stage3.py, config.py) with a 16-bit model keeps fp32 master weights
and fp32 Adam states for its partition (K = 12 bytes per trainable parameter, ZeRO paper §5), and an fp32
gradient partition (4 B); `setup_buckets` (stages 1–2) and the stage-3 constructor allocate a `reduce_bucket_size`-element buffer
(default 5e8) — fp32 for ZeRO-1's accumulator, the 16-bit dtype otherwise. It does not shrink with what trains:
under LoRA it is usually the largest term (the Trainer's "auto" DeepSpeed config sets it to d², far smaller).
- zero1: optimizer states and master weights sharded; 16-bit gradients full.
- zero2: + 16-bit gradients sharded (the model-states figure is DeepSpeed's own 2Ψ + 18Ψ/W).
- zero3: + parameters sharded (`grad_partitions_flat_buffer` holds the 16-bit gradient partition from the start);
  in flight: the module being run plus the prefetch bucket (`stage3_prefetch_bucket_size`, 5e7), at most
  `stage3_max_live_parameters` (1e9), in the 16-bit dtype; the fp32 gradient of one sub-group in the step.
FSDP2 (torch/distributed/fsdp/_fully_shard): one unit per decoder block plus the root (embeddings, final norm,
head); parameters and gradients sharded as stored (mixed precision: fp32 storage, all-gathered in the compute
dtype), the optimizer runs on the shards. In flight: the current and the prefetched block (2 units) and the root,
which stays unsharded through the step; in backward one unit's unsharded gradients before its reduce-scatter.
`fsdp-grad-op` (reshard_after_forward=False, ZeRO-2-like): every unit stays unsharded from its forward to its
backward. `fsdp-hybrid`: sharded within a node, replicated across nodes.
Offload: `optimizer` moves master weights, optimizer states and fp32 gradients to CPU memory; `optimizer+params`
(ZeRO-3 / FSDP only) the parameter shards too.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from peftplan.errors import PlanError
from peftplan.plan import OFFLOADS, STRATEGIES, Plan  # noqa: F401 - re-exported
from peftplan.planning.cards import ModelCard
from peftplan.planning.params import ParamCounts, block_params, total_params
from peftplan.results import Memory

DEEPSPEED = ("zero1", "zero2", "zero3")
FSDP = ("fsdp", "fsdp-grad-op", "fsdp-hybrid")
FP32 = 4


@dataclass(frozen=True)
class Sharding:
    """How one run is spread: world size, shard group, and what the CPU holds."""

    strategy: str  # resolved: "none" for one GPU, "ddp" for several GPUs without --strategy
    world: int  # W
    shard: int  # S
    cpu_offload_bytes: int  # per rank, in host memory


def resolve(plan: Plan) -> str:
    return "ddp" if plan.strategy == "none" and plan.gpus > 1 else plan.strategy


def check(plan: Plan) -> list[str]:
    """Warnings for settings that mean nothing; PlanError for contradictions."""
    s = resolve(plan)
    if plan.offload != "none" and s not in DEEPSPEED + FSDP:
        raise PlanError(f"--offload {plan.offload} needs a ZeRO or FSDP strategy (got {s})")
    if plan.offload == "optimizer+params" and s not in ("zero3",) + FSDP:
        raise PlanError(f"--offload optimizer+params needs zero3 or fsdp (got {s})")
    if s == "fsdp-hybrid" and plan.nodes < 2:
        raise PlanError("fsdp-hybrid shards within a node and replicates across nodes: give --nodes ≥ 2")
    if plan.gpus == 1 and s != "none":
        return [f"--strategy {s} with one GPU shards nothing: the engine's buffers are added, nothing is divided"]
    return []


def _units(card: ModelCard, p: ParamCounts, plan: Plan, frozen_bytes: int, trainable_bytes: int):
    """(one block's stored bytes, the root's stored bytes, one block's trainable bytes), evenly by block."""
    L = card.n_layers
    root_params = total_params(card) - L * block_params(card)
    root_frozen = root_params * (FP32 if plan.method == "qlora" and plan.kbit_prep else plan.bytes_per_element)
    if plan.method == "full":
        root = root_params * plan.bytes_per_element
        block = max(trainable_bytes - root, 0) // L
        return block, root, block
    root = min(root_frozen, frozen_bytes)
    block = (frozen_bytes - root) // L + trainable_bytes // L
    return block, root, trainable_bytes // L


def shard_phases(card: ModelCard, plan: Plan, p: ParamCounts, phases: tuple[Memory, ...]) -> tuple[
        tuple[Memory, ...], Sharding]:
    """The per-GPU phases under `plan.strategy` on `plan.gpus` GPUs (`phases`: one GPU's, per micro-batch)."""
    s = resolve(plan)
    W = plan.gpus
    S = max(1, W // plan.nodes) if s == "fsdp-hybrid" else W
    if s == "none":
        return phases, Sharding("none", 1, 1, 0)
    opt = next(m for m in phases if m.phase == "optimizer")
    Wf, Wt = opt.frozen_weights_bytes, opt.trainable_weights_bytes
    G, O = opt.gradients_bytes, opt.optimizer_states_bytes
    n_t = p.trainable
    te = Wt / n_t if n_t else plan.bytes_per_element
    e16 = 2 if plan.dtype in ("bf16", "fp16") or getattr(plan, "autocast", "none") != "none" else FP32
    block, root, block_t = _units(card, p, plan, Wf, Wt)
    offload_opt = plan.offload in ("optimizer", "optimizer+params")
    offload_params = plan.offload == "optimizer+params"
    out, cpu = [], 0
    fsdp = {fm.phase: fm for fm in fsdp_phases(card, plan, S, phases)} if s in FSDP else {}
    for m in phases:
        g = m.gradients_bytes
        f, t, o, comm, tmp = m.frozen_weights_bytes, m.trainable_weights_bytes, m.optimizer_states_bytes, 0, 0
        if s == "ddp":
            comm = G  # the Reducer's bucket copy of every trainable gradient
        elif s in DEEPSPEED:
            ds16 = te < FP32  # 16-bit trainable weights: DeepSpeed adds fp32 master weights and fp32 Adam states
            states = (O * FP32 / te if ds16 else O) / S
            master = (FP32 * n_t if ds16 else 0) / S
            fp32_grads = (FP32 * n_t if ds16 else 0) / S
            o = states + master
            # the reduce bucket: stages 1-2 allocate it in setup_buckets (twice with overlap_comm, off by default),
            # stage 3 once at construction (one contiguous buffer per gradient dtype); full size, whatever trains
            bucket_dtype = FP32 if s == "zero1" else e16
            comm = bucket_dtype * plan.reduce_bucket_size
            if s == "zero1":
                g = g + (fp32_grads if m.phase == "optimizer" else 0)
            elif s == "zero2":
                g = g / S + fp32_grads  # the owned fp32 partition, kept across steps
            else:  # zero3
                g = G * e16 / te / S if ds16 else G / S  # grad_partitions_flat_buffer, allocated at init
                f, t = f / S, t / S
                if m.phase != "optimizer":
                    live = min(plan.stage3_max_live_parameters * e16,
                               max(block, root) + plan.stage3_prefetch_bucket_size * e16)
                    comm += live
                else:
                    tmp += FP32 * min(1_000_000_000, n_t / S)  # sub_group_size: one fp32 gradient sub-group
            if offload_opt:
                cpu = o + fp32_grads
                o = 0
                g = g - (fp32_grads if s != "zero3" else 0)
            if offload_params:
                cpu += f + t
                f = t = 0
        else:  # FSDP2: its own moments (fsdp_phases); here only what offload moves
            fm = fsdp[m.phase]
            f, t, g, o, comm, tmp = (fm.frozen_weights_bytes, fm.trainable_weights_bytes, fm.gradients_bytes,
                                     fm.optimizer_states_bytes, fm.communication_bytes, 0)
            if offload_opt:
                cpu = o
                o = 0
            if offload_params:
                cpu += f + t
                f = t = 0
            m = replace(m, activations_bytes=fm.activations_bytes, logits_bytes=fm.logits_bytes,
                        temporaries_bytes=fm.temporaries_bytes)
        base_tmp = m.temporaries_bytes
        if m.phase == "optimizer" and s in DEEPSPEED:
            base_tmp = base_tmp / S  # the optimizer runs on the shards: its foreach temporaries shrink with them
        tensor = f + t + g + o + comm + tmp + m.activations_bytes + m.logits_bytes + base_tmp
        frag = int(m.allocator_overhead_bytes * tensor / max(m.tensor_bytes, 1))
        out.append(replace(m, frozen_weights_bytes=int(f), trainable_weights_bytes=int(t), gradients_bytes=int(g),
                           optimizer_states_bytes=int(o), communication_bytes=int(comm),
                           temporaries_bytes=int(base_tmp + tmp), allocator_overhead_bytes=frag))
    return tuple(out), Sharding(s, W, S, int(cpu))


def _mem(phase: str, **b: float) -> Memory:
    return Memory(phase=phase, frozen_weights_bytes=int(b.get("f", 0)), trainable_weights_bytes=int(b.get("t", 0)),
                  gradients_bytes=int(b.get("g", 0)), optimizer_states_bytes=int(b.get("o", 0)),
                  activations_bytes=int(b.get("act", 0)), logits_bytes=int(b.get("logits", 0)),
                  temporaries_bytes=int(b.get("tmp", 0)), cuda_context_bytes=0, allocator_overhead_bytes=0,
                  communication_bytes=int(b.get("comm", 0)))


def _largest(phase: str, candidates: list[dict]) -> Memory:
    return max((_mem(phase, **c) for c in candidates), key=lambda m: m.tensor_bytes)


def fsdp_phases(card: ModelCard, plan: Plan, S: int, phases: tuple[Memory, ...]) -> tuple[Memory, ...]:
    """One rank's phases under FSDP2 (`fully_shard` per decoder block, then the root), sharded over S ranks.

    Bytes live at the moments that can peak, as FSDP2 orders them (torch/distributed/fsdp/_fully_shard/
    _fsdp_param_group.py): R is the root unit unsharded (embeddings, final norm, head), B one block unsharded
    (stored dtype: the trace applies no MixedPrecisionPolicy), B_t its trainable part (its unsharded gradients,
    and the flat reduce-scatter input they are copied into), vd the head's gradient (full fine-tuning).
    - forward, `wait_for_unshard` of unit i: the previous unit's flat all-gather output is still referenced (it
      is freed after the copy-out returns), so flat(i−1) + flat(i) + unsharded(i) are live: 2R + 2B at block 0,
      R + 3B at block i ≥ 1; at the head, R + flat(L−1) with every saved activation and the logits.
    - backward start: the root all-gathered again (2R for the copy-out) under the saved activations, then R
      with the logits' gradient; block i: R, unsharded(i), prefetched flat(i−1), the last reduce-scatter input
      (`reduce_scatter_max_input_buffers` = 1), block i's unsharded gradients and the head's unsharded gradient
      (the root reduce-scatters last); full fine-tuning ends with the embedding's gradient (and, tied, the sum).
    - optimizer: every state sharded; the foreach temporaries shrink with the shards.
    `fsdp-grad-op` (reshard_after_forward=False): units stay unsharded from forward to their backward.
    Frozen weights are sharded too; only trainable ones have gradients and optimizer states.
    Returns (forward, backward, optimizer) Memory with communication_bytes set and no GPU overheads.
    """
    from peftplan.planning.memory import (activations, cached_static_memory, embedding_backward_bytes)

    st = cached_static_memory(card, plan)
    act = activations(card, plan)
    L, ae, tok = card.n_layers, plan.bytes_per_element, plan.tokens
    opt = next(m for m in phases if m.phase == "optimizer")
    block, root, block_t = _units(card, None, plan, opt.frozen_weights_bytes, opt.trainable_weights_bytes)
    base = {"f": st.frozen_weights_bytes / S, "t": st.trainable_weights_bytes / S, "o": st.optimizer_states_bytes / S}
    full = plan.method == "full"
    vd = card.vocab_size * card.d_embed * plan.bytes_per_element if full else 0
    g_blocks = (st.gradients_bytes - (root if full else 0)) / S  # every block's sharded gradient
    f, d = card.d_ff, card.d_model
    ffn_fwd = ((4 if card.gated_mlp else 2) * ae * f + 2 * ae * d) * tok
    ffn_bwd = ((3 if card.gated_mlp else 2) * ae * f + 2 * ae * d) * tok
    saved = act.saved_bytes
    keep = plan.strategy == "fsdp-grad-op"
    held = L * block if keep else 0  # units left unsharded after their forward
    fwd = [
        dict(base, comm=2 * root + 2 * block),
        dict(base, comm=root + held + (3 * block if not keep else 2 * block), act=saved * (L - 1) / L),
        dict(base, comm=root + held + block, act=saved, logits=act.logits_forward_bytes),
    ]
    if plan.grad_checkpointing:
        fwd.append(dict(base, comm=root + held + 2 * block, act=saved + ffn_fwd))
    rs = block_t  # the reduce-scatter input kept until the next unit's post_backward

    def late(i: int, comm: float) -> dict:
        """Block i in backward: what it holds, its unsharded gradients, the head's, and the blocks below's
        saved activations (with checkpointing, their inputs) and the sharded gradients of the blocks above."""
        below = saved * i / L
        return dict(base, comm=comm, act=act.block_bytes + ffn_bwd + below, g=g_blocks * (L - 1 - i) / L,
                    tmp=block_t + vd)

    bwd = [
        # the root all-gathered again (not under fsdp-grad-op: it stayed unsharded), the saved log-softmax live
        dict(base, comm=(1 if keep else 2) * root + held, act=saved, logits=act.logits_backward_bytes // 3),
        # the logits' gradient; the root prefetched the last block's all-gather (no-op when it stayed unsharded)
        dict(base, comm=root + (held if keep else block), act=saved, logits=act.logits_backward_bytes),
        # block 0: itself and the reduce-scatter input of block 1
        late(0, root + block + rs),
        # the last block, first in backward: itself and the prefetched flat all-gather of the one below
        late(L - 1, root + (held if keep else 2 * block)),
    ]
    if L >= 3:  # a middle block: itself, the prefetched one below, the reduce-scatter input of the one above
        bwd.append(late(L - 2, root + ((L - 1) * block if keep else 2 * block) + rs))
    if full:
        emb = embedding_backward_bytes(card, plan)
        bwd.append(dict(base, comm=root + rs, g=g_blocks, tmp=emb + vd + (0 if card.tie_embeddings else vd)))
    opt_m = _mem("optimizer", **dict(base, g=st.gradients_bytes / S, tmp=st.optimizer_temporaries_bytes / S))
    return _largest("forward", fwd), _largest("backward", bwd), opt_m


# ---------------------------------------------------------------- DeepSpeed's own estimators, for comparison


def deepspeed_zero2_model_states(total: int, gpus_per_node: int, nodes: int) -> int:
    """GPU bytes of `estimate_zero2_model_states_mem_needs(..., cpu_offload=False)` in DeepSpeed 0.19
    (runtime/zero/stage_1_and_2.py): 2Ψ + 18Ψ/W (16-bit params; 16-bit and fp32 gradients, fp32 params, fp32
    momentum and variance, all sharded)."""
    return 2 * total + int(18 * total / (gpus_per_node * nodes))


def deepspeed_zero3_model_states(total: int, largest_layer: int, gpus_per_node: int, nodes: int) -> int:
    """GPU bytes of `estimate_zero3_model_states_mem_needs(..., cpu_offload=False)` (runtime/zero/stage3.py):
    4·largest_layer + 18Ψ/W."""
    return 4 * largest_layer + int(18 * total / (gpus_per_node * nodes))
