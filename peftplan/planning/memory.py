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

from peftplan.planning.cards import ModelCard
from peftplan.planning.layout import layout
from peftplan.planning.params import ParamCounts, count, lora_targets, qlora_weight_bytes, quantizable
from peftplan.plan import Plan
from peftplan.results import Memory

FP32 = 4
CUDA_ALLOC_ROUND = 512  # the caching allocator rounds every block up to 512 B
# Outside torch's allocator; measured values replace these when profiles/measured/ has them (see calibration).
CUDA_CONTEXT_BYTES = 500 * 2**20  # CUDA context + kernels image (H100, torch 2.x: ~0.5 GiB seen by NVML)
CUBLAS_WORKSPACE_BYTES = 8 * 2**20  # one cuBLAS workspace per stream (CUBLAS_WORKSPACE_CONFIG default :4096:8)
FRAGMENTATION = 0.02  # reserved/allocated − 1 at the peak, first cut


def activation_element_bytes(plan: Plan) -> int:
    """Element size of the activations. QLoRA's k-bit preparation stores embeddings and norms in fp32, so
    the residual stream and every Linear4bit output (returned in its input's dtype) are fp32."""
    return FP32 if plan.method == "qlora" and plan.kbit_prep else plan.bytes_per_element


def trainable_element_bytes(plan: Plan) -> int:
    """Element size of trainable parameters: LoRA weights made after k-bit preparation are fp32, as peft's."""
    return FP32 if plan.method == "qlora" and plan.kbit_prep else plan.bytes_per_element


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
    largest_gradient_bytes: int  # the first gradient to arrive in backward (output head / top block)


def trainable_tensors(card: ModelCard, plan: Plan) -> list[int]:
    """numel of each trainable tensor (the optimizer keeps state per tensor)."""
    lay = layout(card)
    L = card.n_layers
    if plan.method in ("full", "top"):
        per_block = [x.weight_numel for x in lay.block_linears] + [x.d_out for x in lay.block_linears if x.bias]
        per_block += [n.size for n in lay.block_norms] + [n.size for n in lay.block_norms if n.bias]
        if plan.method == "top":
            return per_block * plan.top_k
        rest = [e.numel for e in lay.embeddings] + [x.weight_numel for x in lay.other_linears]
        rest += [x.d_out for x in lay.other_linears if x.bias]
        rest += [n.size for n in lay.other_norms] + [n.size for n in lay.other_norms if n.bias]
        if not lay.head_tied:
            rest.append(lay.head_rows * lay.head_cols)
        if lay.head_bias:
            rest.append(lay.head_bias)
        return per_block * L + rest
    if plan.method == "adapter":
        m, d = plan.adapter_size, card.d_model
        per = [m * d, m, d * m, d] * (2 if plan.adapter_placement == "houlsby" else 1)
        norms = [n.size for n in lay.block_norms] + [n.size for n in lay.block_norms if n.bias]
        other = [n.size for n in lay.other_norms] + [n.size for n in lay.other_norms if n.bias]
        return (per + norms) * L + other
    out = []
    for lin, in_block in lora_targets(card, plan.targets):
        out += [plan.r * lin.d_in, lin.d_out * plan.r] * (L if in_block else 1)
    return out


def optimizer_state_bytes(numels: list[int], plan: Plan) -> int:
    e = trainable_element_bytes(plan)
    opt = plan.optimizer
    if opt in ("adamw", "paged-adamw"):
        # exp_avg and exp_avg_sq like the parameter, plus a fp32 scalar `step` tensor per parameter
        return sum(2 * rounded(n * e) + rounded(FP32) for n in numels)
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
    if plan.optimizer in ("adamw", "paged-adamw"):
        return sum(rounded(n * e) for n in numels) if plan.foreach else rounded(max(numels) * e)
    return 0  # SGD updates in place; bitsandbytes' 8-bit step works block by block


_STATIC: dict[tuple, Static] = {}


def cached_static_memory(card: ModelCard, plan: Plan) -> Static:
    """Weights, gradients and optimizer states do not depend on the step's shape: cached without it."""
    key = (card, plan.method, plan.r, plan.targets, plan.adapter_size, plan.adapter_placement, plan.top_k,
           plan.dtype, plan.optimizer, plan.foreach, plan.double_quant, plan.kbit_prep)
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
        largest_gradient_bytes=rounded(max(numels) * te) if numels else 0,
    )


# ---------------------------------------------------------------- activations


def _lora_wrapped(card: ModelCard, plan: Plan) -> set[str]:
    if not plan.uses_lora:
        return set()
    return {lin.name for lin, in_block in lora_targets(card, plan.targets) if in_block}


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
    e, d = activation_element_bytes(plan), card.d_model
    if card.norm == "rmsnorm":
        # Gemma-2 multiplies by (1 + γ) in fp32 and casts after: x̂ is saved in fp32
        scaled = FP32 if card.model_type == "gemma2" else e
        return FP32 * d + FP32 + (scaled * d if weight_trains else 0)
    return e * d + 2 * FP32


def block_saved_per_token(card: ModelCard, plan: Plan, trainable_block: bool, first: bool = False) -> float:
    key = (card, plan.method, plan.r, plan.targets, plan.adapter_size, plan.adapter_placement, plan.dtype,
           plan.kbit_prep, plan.dropout, plan.attention, plan.seq_len if plan.attention == "eager" else 0,
           trainable_block, first)
    v = _BLOCK.get(key)
    if v is None:
        if len(_BLOCK) > 65536:
            _BLOCK.clear()
        v = _BLOCK[key] = _block_saved_per_token(card, plan, trainable_block, first)
    return v


_BLOCK: dict[tuple, float] = {}


def _block_saved_per_token(card: ModelCard, plan: Plan, trainable_block: bool, first: bool = False) -> float:
    """Bytes per token one block saves for backward.

    A Linear saves its input when its weight trains or LoRA wraps it (lora_A reads the same input);
    inputs shared by several Linears are saved once. SDPA saves q, k, v, its output (which is also the
    attention output projection's input: flash kernels return it in (b, s, h, d_h) layout) and a fp32
    logsumexp per head. `first`: block 0 of a frozen base, whose input needs no gradient.
    """
    c, e = card, activation_element_bytes(plan)
    d, f, q, k = c.d_model, c.d_ff, c.d_q, c.d_kv
    lora = _lora_wrapped(c, plan)
    attn_in, attn_out, ffn_in, ffn_out = _groups(c)

    def saves(name: str) -> bool:
        return trainable_block or name in lora

    norm_trains = trainable_block or plan.method == "adapter"
    total = 0.0
    # the two pre-norms (Gemma-2's sandwich norms add two more on the sublayer outputs)
    n_norms = len(layout(c).block_norms)
    total += n_norms * norm_saved(c, plan, norm_trains) - (norm_saved(c, plan, norm_trains) if first else 0)
    # normed inputs read by trained/wrapped Linears
    total += e * d * any(saves(n) for n in attn_in) + e * d * any(saves(n) for n in ffn_in)
    if plan.dropout and lora:
        total += (e + 1) * d * (any(n in lora for n in attn_in) + any(n in lora for n in ffn_in))
    total += sum(plan.r * e for n in lora)  # A·x, saved by B
    # attention
    if plan.attention == "sdpa":
        total += e * (2 * q + 2 * k) + FP32 * c.n_heads  # q, k, v, output; logsumexp
    else:
        s = plan.seq_len
        heads = c.n_heads
        # eager: q, k (repeated to h heads), v (repeated), the softmax output (fp32 in the Llama family and OPT,
        # the input dtype in GPT-2 and BERT), and what the A·V matmul reads: the dropout output (with its
        # bool mask) or the softmax cast back to e (a no-op when they agree); and the output copy
        sm = e if c.model_type in ("gpt2", "bert", "roberta") else FP32
        probs = sm + (1 + e if c.attention_dropout > 0 else (e if sm != e else 0))
        total += e * (2 * q) + e * q + probs * heads * s
        total += e * q * saves(attn_out)
    # MLP
    down = saves(ffn_out)
    if c.gated_mlp:
        total += 3 * e * f + e * f * down  # gate, act(gate), up; their product if down saves it
    elif c.activation == "relu":
        total += e * f  # ReLU keeps its output, which is also the down projection's input
    else:
        # GELU keeps its input (+ its output for a training down projection); GPT-2's "gelu_new" is
        # Python ops: x, tanh(·), 0.5·x and 1 + tanh(·) are kept
        total += e * f * ((4 if c.activation == "gelu_new" else 1) + down)
    if c.hidden_dropout > 0:
        total += 2 * d  # a bool mask per sublayer output dropout
    if plan.method == "adapter":
        m = plan.adapter_size
        per = e * d + 2 * e * m  # adapter input, bottleneck pre-activation and activation
        total += per * (2 if plan.adapter_placement == "houlsby" else 1)
    return total


def outside_saved_per_token(card: ModelCard, plan: Plan) -> float:
    """Bytes per token saved outside the blocks: embeddings, final norm, output head (and MLM head)."""
    c, e, d = card, activation_element_bytes(plan), card.d_model
    full = plan.method == "full"
    norms_train = full or plan.method == "adapter"
    total = 0.0
    if c.encoder:
        if full or plan.method == "adapter":  # the embedding LayerNorm needs its input only if something trains
            total += norm_saved(c, plan, norms_train)
        total += d * (c.embed_dropout > 0 and full)
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
    logits_forward_bytes: int  # logits, fp32 upcast and log-softmax during the loss
    logits_backward_bytes: int  # live while the loss backpropagates


def activations(card: ModelCard, plan: Plan) -> Activations:
    c, e, t = card, activation_element_bytes(plan), plan.tokens
    L, V, d = c.n_layers, c.vocab_size, c.d_model
    if plan.method == "full":
        blocks = [block_saved_per_token(c, plan, True)] * L
    elif plan.method == "top":
        # blocks below the trained ones need no input gradient and save nothing
        blocks = [block_saved_per_token(c, plan, True)] * plan.top_k
    else:
        blocks = [block_saved_per_token(c, plan, False, first=True)] + \
            [block_saved_per_token(c, plan, False)] * (L - 1)
    # transformers' causal-LM loss upcasts logits to fp32; the masked-LM loss of BERT/RoBERTa does not
    x = e if c.encoder else FP32
    # Gemma-2 soft-caps the logits, cap·tanh(z/cap): tanh's output is saved for backward
    cap = e if c.hf.get("final_logit_softcapping") else 0
    if plan.grad_checkpointing:
        kept = len(blocks) * e * d  # each checkpointed block keeps only its input
    else:
        kept = sum(blocks)
    final = outside_saved_per_token(c, plan)
    return Activations(
        saved_bytes=int((kept + final) * t),
        block_bytes=int(max(blocks, default=0) * t),
        # logits, their fp32 copy (none when already fp32), the log-softmax output
        logits_forward_bytes=int((e + (x if e != x else 0) + x + cap) * t * V),  # logits, fp32 copy, log-softmax output
        logits_backward_bytes=int((3 * x + cap) * t * V),  # saved log-softmax, its gradient, the input gradient
    )


# ---------------------------------------------------------------- phases


def _gpu_terms(tensor_bytes: int) -> tuple[int, int]:
    return CUDA_CONTEXT_BYTES + CUBLAS_WORKSPACE_BYTES, int(FRAGMENTATION * tensor_bytes)


def _memory(phase: str, st: Static, **live: int) -> Memory:
    tensor = (st.frozen_weights_bytes + st.trainable_weights_bytes + live.get("gradients_bytes", 0)
              + st.optimizer_states_bytes + live.get("activations_bytes", 0) + live.get("logits_bytes", 0)
              + live.get("temporaries_bytes", 0))
    ctx, frag = _gpu_terms(tensor)
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
    """Gradients that arrive last in backward: block 0's and the embeddings' (full fine-tuning only)."""
    return _first_gradients_elements(card) * plan.bytes_per_element if plan.method == "full" else 0


@lru_cache(maxsize=1024)
def _first_gradients_elements(card: ModelCard) -> int:
    lay = layout(card)
    block = sum(x.numel for x in lay.block_linears) + sum(n.numel for n in lay.block_norms)
    return block + sum(x.numel for x in lay.embeddings)


def phases(card: ModelCard, plan: Plan) -> tuple[Memory, Memory, Memory]:
    st = cached_static_memory(card, plan)
    act = activations(card, plan)
    ae, t, f, d = activation_element_bytes(plan), plan.tokens, card.d_ff, card.d_model
    # the working set of one block beyond what it saves: its FFN intermediates (forward, when a checkpointed
    # block saves nothing) and the gradients flowing through it (backward)
    ffn_fwd = ((4 if card.gated_mlp else 2) * ae * f + 2 * ae * d) * t
    ffn_bwd = ((3 if card.gated_mlp else 2) * ae * f + 2 * ae * d) * t
    # forward: everything saved, plus the loss's transient logits (or, checkpointed, the last block running)
    if plan.grad_checkpointing and ffn_fwd > act.logits_forward_bytes:
        fwd = _memory("forward", st, activations_bytes=act.saved_bytes + ffn_fwd)
    else:
        fwd = _memory("forward", st, activations_bytes=act.saved_bytes, logits_bytes=act.logits_forward_bytes)
    # backward: its start (the loss gradient), or its end (block 0 running, almost every gradient
    # accumulated; with checkpointing block 0 recomputed), whichever is larger
    start = act.saved_bytes + act.logits_backward_bytes
    late = st.gradients_bytes - first_gradients_bytes(card, plan)
    if plan.grad_checkpointing:
        late += act.saved_bytes  # checkpoints of the blocks below (block 0 is the worst case, kept simple)
    block0 = act.block_bytes + ffn_bwd
    emb = embedding_backward_bytes(card, plan)
    if emb and emb + st.gradients_bytes > max(start, late + block0 + st.largest_gradient_bytes):
        vd = card.vocab_size * card.d_embed * plan.bytes_per_element
        bwd = _memory("backward", st, gradients_bytes=st.gradients_bytes - vd, temporaries_bytes=emb + vd)
    elif start >= late + block0 + st.largest_gradient_bytes:
        bwd = _memory("backward", st, activations_bytes=act.saved_bytes, logits_bytes=act.logits_backward_bytes)
    else:
        bwd = _memory("backward", st, activations_bytes=block0, gradients_bytes=late,
                      temporaries_bytes=st.largest_gradient_bytes)
    opt = _memory("optimizer", st, gradients_bytes=st.gradients_bytes, temporaries_bytes=st.optimizer_temporaries_bytes)
    return fwd, bwd, opt
