"""Issue 17: the estimate held to its trace on randomly drawn configurations, and the draw itself."""
from __future__ import annotations

import dataclasses
import os
import random
import time

import pytest

from peftplan.plan import ATTENTIONS, DTYPES, METHODS, OPTIMIZERS, PLACEMENTS, Plan
from peftplan.planning import estimate
from peftplan.planning.cards import load_card, registry
from peftplan.trace.check import compare
from peftplan.trace.random_check import DOMAINS, FIXED, FLAGS, check, command, cut, draw_plan, draws, families

TOL = 0.02


def test_issue_case_mistral_qlora_all_linear_checkpointed():
    """The issue's case: Mistral-7B QLoRA all-linear r=32, b=2 s=1024, checkpointing: within 2% at the peak
    and at each phase (the forward holds the checkpoints and the loss's logits together)."""
    from peftplan.trace.run import trace

    card = load_card("mistral-7b-v0.1")
    plan = Plan(method="qlora", r=32, targets="all-linear", batch_size=2, seq_len=1024, grad_checkpointing=True)
    c = compare(estimate(card, plan), trace(card, plan))
    assert abs(c.peak_error) <= TOL, c
    assert all(abs(e) <= TOL for e in c.phase_errors.values()), c.phase_errors


# One small configuration per kind of gap the random draw found. Each is modelled tensor by tensor, so it is
# held to 0.5% of its trace (the gaps were 1.5% to 17%; diluted by weights and logits, some stayed under 2%).
KIND_TOL = 0.005
KINDS = {
    # the frozen head's autocast copy: fp32 weights under autocast, top-k training (its input needs a gradient)
    "top-k autocast head copy": ("roberta-large", 2, dict(method="top", batch_size=6, seq_len=17, dtype="fp32",
                                                         optimizer="adamw8bit", attention="flash", autocast="fp16")),
    "top-k autocast head copy, tied": ("gpt2-medium", 2, dict(method="top", top_k=1, batch_size=2, seq_len=64,
                                                              dtype="fp32", attention="eager", autocast="fp16")),
    # full fine-tuning, end of backward: the embedding's gradient with its output's gradient; the block's
    # largest gradient (not the embedding's) while the lowest block runs its backward
    "full: embedding backward, untied": ("phi-3-mini", 1, dict(method="full", batch_size=7, seq_len=193,
                                                               dtype="fp16", optimizer="paged-adamw8bit",
                                                               foreach=False, grad_checkpointing=True)),
    # Phi-3: v is a view of the fused qkv output (all of it stays saved), q and k are new (RoPE by cat), and the
    # attention output in q's layout is copied for o_proj
    "phi-3 fused qkv": ("phi-3-mini", 2, dict(method="full", batch_size=2, seq_len=96, dtype="fp16",
                                              optimizer="sgd")),
    # the lowest block of a frozen LoRA base saves only what lies downstream of its first wrapped Linear
    "lowest LoRA block, v only, eager": ("llama-3.2-1b", 1, dict(method="lora", targets="v_proj", batch_size=2,
                                                                  seq_len=128, attention="eager")),
    "lowest LoRA block, up only": ("llama-3.2-1b", 1, dict(method="lora", targets="up_proj", batch_size=2,
                                                            seq_len=128)),
    "lowest LoRA block, post-norm": ("bert-base", 1, dict(method="lora", targets="value", batch_size=2,
                                                          seq_len=128, attention="eager")),
    "lowest LoRA block, autocast copies": ("gpt2", 1, dict(method="lora", targets="c_fc", batch_size=2,
                                                           seq_len=128, autocast="bf16", dtype="fp32")),
    # AdamW without foreach: sqrt(exp_avg_sq) and its quotient, both the size of the largest tensor
    "AdamW no-foreach": ("qwen2.5-0.5b", 1, dict(method="full", batch_size=1, seq_len=64, foreach=False)),
    # mixed precision, trained blocks: a block's weight copies live until its backward (recomputed when
    # checkpointed); the last weight gradient in the autocast dtype beside its fp32 cast
    "mixed precision block copies, checkpointed": ("llama-2-7b", 1, dict(method="top", top_k=1, batch_size=1,
                                                                         seq_len=24, dtype="fp32", autocast="fp16",
                                                                         optimizer="sgd", grad_checkpointing=True,
                                                                         grad_accum=4)),
    "mixed precision end of backward": ("llama-2-7b", 1, dict(method="top", top_k=1, batch_size=1, seq_len=24,
                                                              dtype="fp32", autocast="fp16", optimizer="sgd")),
    # AdamW without foreach: the previous tensor's denominator is still bound while gate's twin, up, is updated
    "AdamW no-foreach, equal neighbours": ("llama-2-7b", 1, dict(method="top", top_k=1, batch_size=1, seq_len=16,
                                                                 foreach=False)),
    # QLoRA under autocast on a LayerNorm family: layer_norm runs in fp32, so the Linear4bits return fp32
    "QLoRA autocast LayerNorm": ("bert-base", 3, dict(method="qlora", r=1, double_quant=False, kbit_prep=False,
                                                      batch_size=8, seq_len=55, dtype="fp16", autocast="fp16",
                                                      optimizer="sgd")),
    # checkpointed: enable_input_require_grads makes the frozen blocks below the trained one run backward too
    "checkpointed frozen blocks below": ("llama-2-7b", 3, dict(method="top", top_k=1, batch_size=4, seq_len=512,
                                                                 grad_checkpointing=True, optimizer="sgd")),
    # MoE, trained experts, accumulating: down_proj's new gradient is added into its .grad and freed before
    # gate_up's is made (was +7.7%)
    "MoE trained experts, accumulating": ("mixtral-8x7b", 1, dict(method="full", batch_size=2, seq_len=13,
                                                                  optimizer="sgd-momentum", attention="eager",
                                                                  grad_accum=2, max_grad_norm=0.0,
                                                                  moe_routing="worst")),
    # ModernBERT's card says LayerNorm (bias-free) and a gated MLP chunked from Wi (cardgen reads the classes):
    # under autocast the GLU's Wi output is in the autocast dtype, layer_norm runs in fp32 (was -3.6%)
    "ModernBERT QLoRA DoRA autocast": ("modernbert-base", 2, dict(method="qlora", targets="all-linear",
                                                                  use_dora=True, kbit_prep=False, dtype="fp16",
                                                                  autocast="fp16", batch_size=3, seq_len=64)),
    # full fine-tuning, first moments of backward: the untied head's weight gradient beside every saved tensor
    # and the logits' gradient; under autocast its fp16 gradient and fp32 cast together; accumulating, a
    # temporary beside every gradient (was -11.7%)
    "full: head gradient at backward start": ("tinyllama-1.1b", 1, dict(method="full", batch_size=1, seq_len=16,
                                                                        dtype="fp32", autocast="fp16",
                                                                        optimizer="sgd", grad_accum=2)),
    # a block's backward in order: QLoRA dequantizes the down projection beside the FFN's working set, the wider
    # gate_up after the MLP's saved tensors (and the LoRA branches' dropout copies) were freed (was +8.8%); a
    # trained block writes down's gradient beside its input's gradient, gate_up's after the MLP's tensors died
    "block backward order: QLoRA dequantization": ("phi-3-mini", 1, dict(
        method="qlora", r=128, dropout=0.05, targets=r"re:.*\.(self_attn\.qkv_proj|self_attn\.o_proj|mlp\."
        r"gate_up_proj|mlp\.down_proj)", batch_size=2, seq_len=867, dtype="fp32", optimizer="sgd", foreach=False,
        grad_checkpointing=True, grad_accum=2, max_grad_norm=0.0)),
    # BERT under autocast over bf16 weights: the residual stream is a LayerNorm output, fp32 (autocast runs
    # layer_norm in fp32), so each post-norm LayerNorm saves a fp32 input (was -1.0%)
    "post-norm LayerNorm stream under autocast": ("bert-base", 1, dict(targets="query,value", batch_size=8,
                                                                       seq_len=128, optimizer="sgd",
                                                                       autocast="bf16")),
    # DoRA, checkpointed: the weight norm recomputed in backward runs after the head's backward freed the head's
    # autocast copy (QLoRA + DoRA under autocast, an fp32 head after k-bit preparation; was +12%)
    "DoRA recompute without the head's copy": ("llama-2-7b", 1, dict(method="qlora", use_dora=True,
                                                                     targets="all-linear", batch_size=1, seq_len=32,
                                                                     autocast="bf16", grad_checkpointing=True)),
    # peft's wrapped Linears outside the blocks (BERT's MLM transform dense): lora_A's input, A·x and DoRA's saved
    # tensors (was -2.6%)
    "LoRA/DoRA outside the blocks": ("bert-base", 1, dict(method="lora", use_dora=True, r=256, targets="all-linear",
                                                          batch_size=7, seq_len=309, dtype="fp16")),
    # DoRA's weight norm in a fused gate_up projection runs before down_proj saved anything (was +7.1%)
    "DoRA norm before the later modules": ("phi-3-mini", 1, dict(method="lora", use_dora=True, dropout=0.1,
                                                                 targets="gate_up_proj,down_proj", batch_size=1,
                                                                 seq_len=32)),
    # checkpointed DoRA down_proj: its recomputation starts at the first node that unpacks, after the gradients
    # of the block output, of result.to(dtype), of the base branch's cast and of `· scaling` (was -2.1%)
    "DoRA recompute beside the output's gradients": ("phi-3-mini", 1, dict(method="lora", r=1, alpha=8.0,
                                                                           targets="qkv_proj,down_proj",
                                                                           batch_size=4, seq_len=340, dtype="fp32",
                                                                           grad_checkpointing=True, use_dora=True,
                                                                           autocast="fp16", grad_accum=4,
                                                                           max_grad_norm=0.0)),
    # DoRA on a Linear with a bias under mixed precision: peft saves base_result - bias, promoted to the fp32
    # bias's dtype (was -0.85%; Pythia's draw -3.0%)
    "DoRA base output minus an fp32 bias": ("opt-125m", 1, dict(method="lora", r=2, targets="fc1,fc2", batch_size=4,
                                                                seq_len=256, dtype="fp32", use_dora=True,
                                                                autocast="fp16")),
    # T5 (planning/seq2seq.py): its own CrossEntropyLoss shifts nothing, so transformers <= 4.48's shifted
    # logits copy does not apply; Houlsby adapters at the FFN only (was +5.2%)
    "T5 adapters at the FFN, old loss": ("flan-t5-base", 1, dict(method="adapter", adapter_size=8,
                                                                 adapter_placement="ffn", batch_size=4, seq_len=62,
                                                                 grad_checkpointing=True, attention="eager",
                                                                 logits_shift_copy=True)),
    # parallel block (Falcon, GPT-NeoX): the MLP reads the norm of the block's input, so in the lowest block of
    # a frozen base LoRA on query_key_value gives the MLP no input gradient: no saved MLP tensors nor weight
    # copies (was +11.1%)
    "parallel block, lowest LoRA block": ("falcon-7b", 1, dict(method="lora", r=32, targets="query_key_value",
                                                               batch_size=6, seq_len=92, dtype="fp32",
                                                               optimizer="sgd-momentum", foreach=False,
                                                               attention="eager", autocast="fp16",
                                                               max_grad_norm=0.0, logits_shift_copy=True)),
    # full fine-tuning, backward's first weight gradient: the head's, in the autocast dtype beside its fp32
    # cast, with every saved tensor and weight copy alive (Falcon-7B fp16 autocast 4 blocks: was -3.4%; this
    # 1-block cut of an untied head: -9.6%)
    "full: head gradient first": ("llama-2-7b", 1, dict(method="full", batch_size=2, seq_len=64, dtype="fp32",
                                                        optimizer="sgd", autocast="fp16", grad_accum=2)),
    # QLoRA under autocast, fused qkv on a LayerNorm family (GPT-NeoX): the Linear4bit's output is fp32, SDPA
    # saves autocast copies of q, k, v, not the fused output (Pythia 3 blocks: was +4.7%)
    "QLoRA autocast fused qkv": ("pythia-1b", 2, dict(method="qlora", r=4, batch_size=4, seq_len=256,
                                                      dtype="fp32", optimizer="sgd", attention="flash",
                                                      autocast="bf16")),
    # peft's LoRA on fused experts with the adapter in the weights' dtype: the baddbmm's factors are views of A
    # and B, not copies (was +6.3%: the forward, +4.9%, now exact)
    "MoE LoRA experts, adapter in weight dtype": ("mixtral-8x7b", 1, dict(method="lora", r=64, targets="all-linear",
                                                                           seq_len=10, optimizer="sgd",
                                                                           adapter_dtype="bf16")),
    # peft's merged expert stacks, the lowest block's backward peak: a merged stack's full-size gradient, made
    # before the block's LoRA factor gradients (not the largest gradient beside it; was +3.1%, the draw's
    # checkpointed Mixtral / Qwen3-MoE QLoRA r=256 rows +2.9% to +4.5%)
    "MoE merged experts, lowest block backward": ("mixtral-8x7b", 1, dict(method="qlora", r=128,
                                                                          targets="all-linear", kbit_prep=False,
                                                                          seq_len=32, grad_checkpointing=True,
                                                                          optimizer="sgd")),
    # Falcon's multi-query attention on SDPA's math path, checkpointed: the attention's backward holds three fp32
    # b·h·s² tensors (probabilities, their gradient, the softmax's input gradient) and the fp32 q and k (was -9.8%)
    "SDPA math attention backward": ("falcon-7b", 1, dict(method="adapter", batch_size=2, seq_len=1024,
                                                          grad_checkpointing=True, attention="sdpa")),
    # MoE, trained experts, accumulating: at gate_up's new weight gradient the block's saved down-side tensors are
    # freed, as without accumulation (was +1.8%)
    "MoE trained experts, accumulating, top-k": ("mixtral-8x7b", 1, dict(method="top", top_k=1, batch_size=2,
                                                                         seq_len=256, optimizer="sgd",
                                                                         attention="flash", grad_accum=4)),
    # autocast on a LayerNorm family: layer_norm saves the fp32 cast of its input and returns fp32 (the head's
    # input); the autocast cache keeps only fp32 leaves cast down, not the embedding output's fp32 up-cast
    # (checkpointed Pythia LoRA: was -2.0%)
    "autocast LayerNorm, fp32 input and output": ("pythia-1b", 1, dict(method="lora", r=8, batch_size=7,
                                                                       seq_len=984, optimizer="sgd",
                                                                       grad_checkpointing=True, attention="flash",
                                                                       autocast="bf16")),
    # Falcon-7B's parallel block has one LayerNorm: the attention's and the MLP's inputs are one tensor (the
    # check_families row that was +0.86%); the SDPA math path's output is copied for `dense`
    "parallel block, one norm output": ("falcon-7b", 2, dict(method="qlora", r=16, targets="all-linear",
                                                             batch_size=2, seq_len=256, attention="eager")),
    # Falcon's Linears multiply by `weight.T`: autocast casts a view, which its cache never keeps, so a
    # checkpointed forward holds no block weight copies (4 blocks, few tokens, so the forward peaks: was +4.7%)
    "Falcon uncached casts, checkpointed": ("falcon-7b", 4, dict(method="top", top_k=1, batch_size=5, seq_len=11,
                                                                 dtype="fp32", optimizer="sgd",
                                                                 grad_checkpointing=True, autocast="bf16",
                                                                 grad_accum=4)),
    # T5 LoRA dropout (planning/seq2seq.py): each wrapped Linear keeps its dropout output (cast as A reads it)
    # and a 1-byte mask, not the shared input (was -8.3%; the draw's fp16 all-linear row -15.0%)
    "T5 LoRA dropout": ("flan-t5-base", 1, dict(method="lora", r=8, dropout=0.05, targets="all-linear",
                                                batch_size=2, seq_len=128, dtype="bf16", foreach=False,
                                                attention="flash", adapter_dtype="bf16")),
    # T5 on an fp16 stream: T5Block clamps each sublayer's output with tensor bounds; clamp keeps its input
    # (this cut was -1.6%;
    # the draw's fp32 row -2.0%)
    "T5 fp16 clamps": ("flan-t5-base", 1, dict(method="lora", r=8, targets="all-linear", batch_size=2, seq_len=128,
                                               dtype="fp16", foreach=False, attention="flash",
                                               adapter_dtype="fp16")),
    # full T5 under autocast: at the shared embedding's gradient moment the encoder's autocast weight copies are
    # still saved (was -6.4%)
    "T5 full autocast, encoder copies at the tied embedding": ("flan-t5-base", 1, dict(
        method="full", batch_size=4, seq_len=64, dtype="fp32", optimizer="sgd", foreach=False, attention="eager",
        autocast="bf16")),
    # QLoRA on T5 with k-bit preparation under autocast: the unquantized wo, cast to fp32, is copied per call;
    # SDPA saves autocast copies; Linear4bit returns the fp32 stream's dtype (was -2.6%; the draw's +6.0% row)
    "T5 QLoRA k-bit prep autocast": ("flan-t5-base", 1, dict(method="qlora", r=8, dropout=0.05, double_quant=False,
                                                             batch_size=4, seq_len=64, attention="flash",
                                                             adapter_dtype="bf16", autocast="bf16")),
    # T5 eager attention under autocast: softmax (autocast's fp32 list) keeps fp32 probabilities and the matmul
    # with v an autocast copy (was -4.0%; the draw's 3-block row -5.7%, bf16 adapters -2.5%)
    "T5 eager autocast, fp32 scores": ("flan-t5-base", 1, dict(method="full", batch_size=2, seq_len=340,
                                                               dtype="fp32", optimizer="sgd", foreach=False,
                                                               attention="eager", autocast="bf16")),
    # full T5 on SDPA under autocast: the trained bias reaches the memory-efficient kernel uncast, fp32
    # (was -2.1%; the draw's row -2.4%)
    "T5 SDPA autocast, fp32 trained bias": ("flan-t5-base", 1, dict(method="full", batch_size=2, seq_len=340,
                                                                    dtype="fp32", optimizer="sgd", foreach=False,
                                                                    attention="sdpa", autocast="bf16")),
    # mixed precision, a trained block's backward: the FFN output projection's autocast weight copy dies with its
    # node (the cache was cleared when the autocast region ended), before the input projections' weight
    # gradients (planning/autocast_copies.py; the 1,000 draw's row: was +3.06%; checkpointed Falcon: was +4.96%)
    "mixed precision, FFN output copy freed": ("opt-6.7b", 1, dict(method="top", top_k=1, seq_len=59, dtype="fp32",
                                                                    optimizer="adamw8bit", attention="flash",
                                                                    autocast="fp16", logits_shift_copy=True)),
    "mixed precision, FFN output copy freed, checkpointed": ("falcon-7b", 1, dict(
        method="top", top_k=1, batch_size=2, seq_len=13, dtype="fp32", optimizer="adamw8bit",
        grad_checkpointing=True, attention="eager", autocast="bf16", logits_shift_copy=True)),
    # OLMo-2 normalises each sublayer's output: q, k and v read the block input, which needs no gradient in the
    # lowest trained block, so their autocast copies are not saved for backward (was +1.57%; the draw's olmo-2
    # top-1 row's backward +1.30%)
    "mixed precision, OLMo-2 attention copies unsaved": ("olmo-2-7b", 1, dict(method="top", top_k=1, batch_size=4,
                                                                              seq_len=128, dtype="fp32",
                                                                              optimizer="sgd", attention="flash",
                                                                              autocast="bf16")),
    # QLoRA, the lowest wrapped block (not checkpointed): a Linear4bit whose input needs no gradient runs no
    # autograd node, so its weight is not dequantized in backward (planning/dequant.py; LoRA on the down
    # projection alone: was +7.5%; the draw's Falcon row +18.5%)
    "QLoRA lowest block, no dequantization": ("llama-2-7b", 1, dict(method="qlora", r=8, targets="down_proj",
                                                                    seq_len=16)),
    "QLoRA lowest block, no dequantization, autocast": ("falcon-7b", 1, dict(
        method="qlora", r=8, alpha=8.0, targets="dense_4h_to_h", double_quant=False, kbit_prep=False, batch_size=2,
        seq_len=16, optimizer="sgd-momentum", attention="eager", adapter_dtype="bf16", autocast="bf16",
        logits_shift_copy=True)),
    # QLoRA on T5 loaded in fp32 without k-bit preparation: the unquantized wo keeps the load dtype, fp32, so
    # autocast copies it per call as after k-bit preparation (planning/seq2seq.py; was -11.6%, the draw's
    # Flan-T5-large row -16.0%)
    "T5 QLoRA fp32 load autocast": ("flan-t5-base", 1, dict(method="qlora", r=8, targets="all-linear", kbit_prep=False,
                                                           seq_len=24, dtype="fp32", optimizer="sgd",
                                                           autocast="fp16")),
    # LoRA on a layer that differs from the block (DeepSeek-V2's dense first layer, its fused expert stacks):
    # planning/moe.py counts it, not dora.outside_saved_per_token's "outside the blocks" (was +122% after a merge)
    "LoRA on layers unlike the block": ("deepseek-v2-lite", 3, dict(method="lora", targets="all-linear",
                                                                    batch_size=1, seq_len=128)),
    # a frozen block under reentrant checkpointing runs its backward (inputs made to require grad): GPT-J's
    # "gelu_new" is a product of two saved tensors, whose backward makes both factors' gradients (this cut was -1.6%;
    # the draw's fp32 row -2.0%)
    "gelu_new frozen block, reentrant": ("gpt-j-6b", 2, dict(method="top", top_k=1, batch_size=2, seq_len=256,
                                                             optimizer="sgd", grad_checkpointing=True,
                                                             use_reentrant=True)),
    # frozen blocks below the trained ones (checkpointed): the highest runs its eager softmax backward beside every
    # frozen block's kept input, the residual and FFN-branch gradients and v's (this cut was -2.7%; the draw's
    # llama-33b top-2 row -2.4%)
    "frozen block eager backward": ("mistral-7b-v0.1", 3, dict(method="top", top_k=1, batch_size=2, seq_len=1024,
                                                               optimizer="sgd", grad_checkpointing=True,
                                                               attention="eager", use_reentrant=True)),
    # a trained gelu_new FFN's backward: both factors' gradients beside the incoming one, fp32 under autocast
    # (pow(x, 3) is on autocast's fp32 list), the down projection's saved copy freed (this cut was -5.7%; the draw's
    # 3-block top-3 row -6.4%)
    "gelu_new trained block, autocast": ("gpt-j-6b", 2, dict(method="top", top_k=2, batch_size=4, seq_len=512,
                                                             optimizer="sgd", foreach=False, max_grad_norm=0.0,
                                                             grad_checkpointing=True, autocast="bf16")),
    # top-k, the end of backward: the lowest trained block's first Linear (norm outputs, gradients in flight);
    # checkpointed, its kept input and an RMSNorm's fp32 backward (this cut was -2.5%)
    "top-k end of backward, RMSNorm": ("mistral-7b-v0.1", 2, dict(method="top", top_k=2, batch_size=2, seq_len=256,
                                                                  optimizer="sgd", foreach=False, max_grad_norm=0.0,
                                                                  grad_checkpointing=True)),
    # LoRA dropout on the FFN output projection with fp32 adapters: its backward's adapter-dtype f-wide gradients
    # (lora_A's input gradient, the dropout backward's output) beside the recomputed block (this cut was -4.1%;
    # the draw's llama-33b reentrant row -2.9%)
    "LoRA dropout on down_proj, fp32 adapters": ("mistral-7b-v0.1", 2, dict(method="lora", targets="all-linear",
                                                                          dropout=0.1, batch_size=2, seq_len=512,
                                                                          grad_checkpointing=True)),
    # Falcon's SDPA math path in the lowest block of a frozen base whose q/k/v are not wrapped: the matmuls save
    # nothing (this cut was +2.3%; the draw's QLoRA row +5.9%)
    "SDPA math path, no q/k gradient": ("falcon-7b", 2, dict(method="lora", targets="dense", batch_size=4,
                                                             seq_len=256, dtype="fp32", autocast="bf16")),
    # a frozen gated MLP's backward (LoRA/QLoRA base, down projection not wrapped): the product's mul backward
    # makes both factors' gradients beside the incoming one (this cut was -4.6%)
    "frozen gated MLP product backward": ("llama-2-13b", 3, dict(method="qlora", r=8, dropout=0.1, batch_size=7,
                                                                 seq_len=412, dtype="fp16",
                                                                 grad_checkpointing=True)),
    # Gemma-2 eager attention: the soft-capped logits' tanh output is saved (this cut was -1.1%; the draw's
    # gemma-2-9b 4-block row -2.6%)
    "Gemma-2 eager, soft-capped logits": ("gemma-2-2b", 2, dict(method="lora", batch_size=2, seq_len=1024,
                                                                dtype="fp32", attention="eager",
                                                                optimizer="sgd")),
    # DoRA in a parallel block (Falcon, GPT-J, GPT-NeoX): in the lowest block of a frozen base the FFN reads the
    # block's input, which needs no gradient, so LoRA dropout's recomputed F.linear keeps no dequantized weight
    # of dense_h_to_4h (planning/dora.py `_input_has_grad`; the draw's Falcon row +3.84%, this cut was +7.8%)
    "DoRA parallel block, FFN input without gradient": ("falcon-7b", 1, dict(
        method="qlora", r=2, dropout=0.1, targets="all-linear", kbit_prep=False, batch_size=1, seq_len=128,
        optimizer="sgd", foreach=False, attention="eager", adapter_dtype="bf16", use_dora=True)),
    # DoRA's forward peak at a fused projection's weight norm (Phi-4 gate_up_proj): the top block's down_proj
    # has not run, so neither its autocast weight copy nor the MLP's saved tensors exist (dora.py
    # `_later_copies`, `_later_plain`; the draw's Phi-4 row +2.05%, this cut was +2.4%)
    "DoRA forward, fused FFN projection's norm": ("phi-4", 1, dict(
        r=8, targets="re:.*\\.(mlp\\.gate_up_proj)", batch_size=1, seq_len=16, dtype="fp32", optimizer="sgd",
        foreach=False, use_dora=True, autocast="bf16")),
    # the same on every Linear of Phi-3-mini (the draw's row +1.76%, this cut was +2.6%)
    "DoRA forward, all-linear Phi-3": ("phi-3-mini", 1, dict(
        r=8, targets="all-linear", batch_size=1, seq_len=16, dtype="fp32", optimizer="sgd", foreach=False,
        use_dora=True, autocast="bf16")),
    # DoRA on GPT-J's attention: at a projection's weight norm the attention kernel and the MLP have not run,
    # the earlier q/k outputs and the lowest block's input are alive as locals (dora.py `_block_locals`; GPT-J
    # draws +2% to +7%, this cut was +2.9%)
    "DoRA forward, GPT-J attention projection's norm": ("gpt-j-6b", 1, dict(
        r=2, alpha=32.0, targets="all-linear", batch_size=4, seq_len=29, dtype="fp32", optimizer="sgd",
        foreach=False, attention="flash", use_dora=True, autocast="bf16")),
    # QLoRA under autocast with DoRA: a DoRA module returns fp32 (its magnitude scale promotes the sum, the 4-bit
    # twin casts nothing back), so the FFN's output projection and the next block work in fp32: the weight norm's
    # working set is fp32 (dora.py `_promoted`; the draw's Mistral-NeMo row was -14.1%, OLMo-2 -7.6%)
    "DoRA QLoRA autocast, fp32 promotion across blocks": ("mistral-nemo-12b", 2, dict(
        method="qlora", r=2, alpha=32.0,
        targets="re:.*\\.(self_attn\\.q_proj|self_attn\\.k_proj|self_attn\\.v_proj|mlp\\.up_proj)",
        kbit_prep=False, batch_size=8, seq_len=8, optimizer="sgd", foreach=False, attention="flash", use_dora=True,
        autocast="bf16")),
    "DoRA QLoRA autocast, fp32 product into down_proj": ("olmo-2-7b", 1, dict(
        method="qlora", r=8, targets="all-linear", kbit_prep=False, batch_size=1, seq_len=32, dtype="fp16",
        optimizer="sgd", foreach=False, use_dora=True, autocast="fp16")),
    # DoRA, checkpointed, recomputing the lowest block's fused FFN input projection: the block's later Linears
    # (their autocast weight copies, the MLP's saved tensors) are not yet recomputed at its weight norm
    # (dora.recomputed_after_bytes; the draw's Falcon row: was +3.05%)
    "DoRA recompute, later tensors not yet made": ("falcon-7b", 3, dict(
        r=128, alpha=32.0, dropout=0.1,
        targets=r"re:.*\.(self_attention\.query_key_value|self_attention\.dense|mlp\.dense_h_to_4h)",
        batch_size=2, seq_len=126, dtype="fp32", optimizer="adamw8bit", grad_checkpointing=True,
        attention="flash", use_dora=True, autocast="fp16")),
    # DoRA, reentrant checkpointing: the recomputation runs beside the block output's gradient alone, and the
    # residual sum after attention is held by the block's frame (the draw's Phi-3 row: was +2.47%)
    "DoRA reentrant recompute, residual in flight": ("phi-3-mini", 4, dict(
        r=4, alpha=32.0, targets=r"re:.*\.(self_attn\.qkv_proj|mlp\.gate_up_proj)", batch_size=5, seq_len=208,
        dtype="fp16", optimizer="paged-adamw8bit", grad_checkpointing=True, attention="flash",
        adapter_dtype="fp16", use_dora=True, use_reentrant=True)),
    # DoRA, checkpointed, many tokens: the recomputed module's peak is where it combines its outputs (three
    # d_out-wide products beside lora_weight and its graph), not its weight norm (dora.result_working_set); a gated
    # MLP has run act(gate_proj(x)) before up_proj (was -0.66%, two misses cancelling; the draw's OPT-66B row -2.2%)
    "DoRA recompute, combining the outputs": ("llama-65b", 2, dict(
        r=1, alpha=8.0, targets="q_proj,v_proj,up_proj", batch_size=7, seq_len=744, dtype="fp16", optimizer="sgd",
        grad_checkpointing=True, attention="flash", adapter_dtype="fp16", use_dora=True)),
    # DoRA recompute, LoRA dropout under autocast: the dropout output (adapter dtype) lives from before the norm
    # until DoRA returns, beside lora_A's autocast copy once made (dora.dropout_output_bytes; was -2.08%, the
    # draw's 2-block row -3.31%)
    "DoRA recompute, dropout output under autocast": ("falcon-7b", 1, dict(
        r=2, dropout=0.05, targets=r"re:.*\.(self_attention\.query_key_value|mlp\.dense_4h_to_h)", batch_size=6,
        seq_len=321, dtype="fp16", optimizer="sgd-momentum", grad_checkpointing=True, use_dora=True,
        autocast="fp16", max_grad_norm=0.0)),
    # DoRA recompute under autocast: the recomputation's own autocast region caches the LoRA factors' casts made
    # so far in the block (dora.recompute_lora_cache_bytes; was -1.23%)
    "DoRA recompute, LoRA factors in the autocast cache": ("modernbert-base", 2, dict(
        r=128, alpha=8.0, dropout=0.1, targets="all-linear", batch_size=4, seq_len=12, optimizer="adamw8bit",
        grad_checkpointing=True, use_dora=True, autocast="bf16", grad_accum=2)),
    # DoRA recompute in OPT: the FFN output's dropout unpacks its mask before any DoRA node runs; ReLU saves the
    # output projection's input; the block calls fc1 itself, so the norm's output is gone (was +2.12%)
    "DoRA recompute, OPT's inline ReLU FFN": ("opt-6.7b", 4, dict(
        r=4, alpha=32.0, dropout=0.05,
        targets=r"re:.*\.(self_attn\.q_proj|self_attn\.k_proj|self_attn\.v_proj|self_attn\.out_proj|fc1|fc2)",
        batch_size=7, seq_len=207, dtype="fp32", foreach=False, grad_checkpointing=True, use_dora=True,
        grad_accum=4, logits_shift_copy=True)),
    # QLoRA, checkpointed, a frozen 4-bit down projection: bitsandbytes' MatMul4Bit saves nothing through
    # save_for_backward, so GPT-J's fc_out dequantizes its weight before the block is recomputed, beside the kept
    # input alone (dequant.down_proj_before_recompute; was +4.70% with DoRA, +5.00% without)
    "QLoRA down projection before the recompute": ("gpt-j-6b", 2, dict(
        method="qlora", r=256, dropout=0.1, double_quant=False, kbit_prep=False, batch_size=8, seq_len=64,
        dtype="fp32", optimizer="adamw8bit", grad_checkpointing=True, attention="eager", use_dora=True)),
    # DoRA recompute, QLoRA under autocast without dropout: the caller's fp32 x of the FFN output projection is
    # in flight once (dora.in_flight_bytes), not again in autocast_input_in_flight_bytes (was +2.57%)
    "DoRA recompute, QLoRA autocast input counted once": ("gpt-j-6b", 2, dict(
        method="qlora", targets="all-linear", double_quant=False, batch_size=5, seq_len=453, optimizer="sgd",
        grad_checkpointing=True, attention="flash", use_dora=True, autocast="bf16", logits_shift_copy=True)),
}

# Kinds whose fix leaves a known residual above KIND_TOL, held to 1% (the residual named with each)
KINDS_1PCT = {
    # DoRA recompute, QLoRA under autocast in OPT: the caller's fp32 x of fc2 (lora_A saves autocast's copy) is
    # counted once, by in_flight_bytes, and cancelled where ReLU saves it; the LayerNorm's fp32 output is gone
    # once fc1 returns (dora.in_flight_overcount_bytes; was +2.86% after merging the forward and backward fixes).
    # Residual +0.62%: fc2's own LoRA branch counted at its weight norm; leaving it out there (as the trace has it
    # for OPT) moves GPT-J's QLoRA DoRA case above from -0.27% to -1.70%, so the moment is not yet understood.
    "DoRA recompute, QLoRA autocast OPT inputs counted once": ("opt-6.7b", 1, dict(
        method="qlora", r=64, alpha=8.0, targets="all-linear", double_quant=False, batch_size=2, seq_len=211,
        optimizer="adamw8bit", foreach=False, grad_checkpointing=True, adapter_dtype="bf16", use_dora=True,
        autocast="bf16", grad_accum=4, logits_shift_copy=True)),
}


@pytest.mark.parametrize("kind", KINDS_1PCT)
def test_kind_within_1pct(kind):
    from peftplan.trace.run import trace

    name, k, fields = KINDS_1PCT[kind]
    card, plan = cut(load_card(name), k), Plan(**fields)
    c = compare(estimate(card, plan), trace(card, plan))
    assert abs(c.peak_error) <= 0.01, (kind, c.peak_error, c.phase_errors)


@pytest.mark.parametrize("kind", KINDS)
def test_kind_within_2pct(kind):
    from peftplan.trace.run import trace

    name, k, fields = KINDS[kind]
    card, plan = cut(load_card(name), k), Plan(**fields)
    c = compare(estimate(card, plan), trace(card, plan))
    assert abs(c.peak_error) <= KIND_TOL, (kind, c.peak_error, c.phase_errors)


def _draw_40():
    seed = int(os.environ.get("PEFTPLAN_SEED", time.time_ns() % 1_000_000))
    print(f"\nrandom draw seed {seed} (replay: PEFTPLAN_SEED={seed} or peftplan check --random 40 --seed {seed})")
    results, failures = check(draws(40, seed))
    assert not failures, f"seed {seed}: {failures}"
    return seed, [(abs(c.peak_error), f"{100 * c.peak_error:+.2f}% {command(card, c.plan)}") for card, c in results]


@pytest.mark.slow  # the issue's 2% on a fresh seed (the 1,000-draw benchmark meets it; README "Off the grid")
def test_random_draw_within_2pct():
    """A fresh seed every run (printed; set PEFTPLAN_SEED to replay): 40 random configurations within 2%."""
    seed, rows = _draw_40()
    bad = [line for err, line in rows if err > TOL]
    assert not bad, f"seed {seed}:\n" + "\n".join(bad)


GUARD_TOL = 0.05  # 2.8× the 1,000-draw maximum (1.79%, README "Off the grid"): a regression guard


def test_random_draw_runs_everywhere():
    """The default run's draw (issue 17): a fresh seed, 40 draws, each one estimated and traced without a
    failure and within GUARD_TOL; the errors beyond 2% are printed with their replay commands."""
    seed, rows = _draw_40()
    beyond = sorted((line for err, line in rows if err > TOL), key=len)
    print(f"seed {seed}: {len(beyond)} of {len(rows)} beyond 2%" + "".join(f"\n  {b}" for b in beyond))
    assert len(rows) == 40
    assert all(err <= GUARD_TOL for err, _ in rows), f"seed {seed}:\n" + "\n".join(beyond)


def test_every_plan_field_is_drawn():
    """Each Plan field has a domain (or is a bool), and over many draws every field takes several values:
    every family, method, dtype, optimizer, attention, placement; all-linear, lists and regex targets; odd s."""
    assert {f.name for f in dataclasses.fields(Plan) if f.type not in (bool, "bool")} <= set(DOMAINS)
    cfgs = draws(600, 1)
    for f in dataclasses.fields(Plan):
        if f.name not in FIXED:
            assert len({getattr(p, f.name) for _, p in cfgs}) >= 2, f.name
    plans = [p for _, p in cfgs]
    assert {c.model_type for c, _ in cfgs} == set(families())
    assert {p.method for p in plans} == set(METHODS)
    assert {p.dtype for p in plans} == set(DTYPES)
    assert {p.optimizer for p in plans} == set(OPTIMIZERS)
    assert {p.attention for p in plans} == set(ATTENTIONS)
    assert {p.adapter_placement for p in plans} == set(PLACEMENTS)
    targets = {p.targets for p in plans}
    assert None in targets and "all-linear" in targets
    assert any(t and t.startswith("re:") for t in targets) and any(t and "," in t for t in targets)
    assert any(p.seq_len % 2 for p in plans)
    assert all(p.seq_len <= c.max_positions or not c.max_positions for c, p in cfgs)  # 0: no table (ALiBi)
    assert {c.n_layers for c, _ in cfgs} >= {1, 2, 3, 4}


def test_new_field_without_domain_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Wider(Plan):
        micro_batches: int = 1

    import peftplan.trace.random_check as rc

    saved = rc.Plan
    rc.Plan = Wider
    try:
        from peftplan.errors import PlanError

        with pytest.raises(PlanError, match="micro_batches"):
            draw_plan(random.Random(0), registry()["opt-125m"])
    finally:
        rc.Plan = saved


def test_draw_is_reproducible_and_command_replays_it():
    """The same seed draws the same list, and the printed command parses back to the same card and plan."""
    import shlex

    import typer

    from peftplan.trace.cli import register

    a, b = draws(30, 9), draws(30, 9)
    assert a == b and a != draws(30, 10)
    app = typer.Typer()
    register(app)
    trace_cmd = typer.main.get_command(app).commands["trace"]
    for card, plan in a:
        args = shlex.split(command(card, plan))[2:]
        params = trace_cmd.make_context("trace", args).params
        names = [f.name for f in dataclasses.fields(Plan) if f.name not in FIXED or FLAGS.get(f.name) in params]
        assert Plan(**{n: params[FLAGS.get(n, n)] for n in names}) == plan
        base = load_card(params["model"])
        assert cut(base, params["n_layers"] or base.n_layers) == card


def test_cut_card_is_exact_per_block():
    """Why a cut card checks the full card: the traced peak of each phase is affine in the number of blocks
    (a + b·k, every block the same shapes), so k = 2, 3, 4 predict the whole card's trace to the byte, and
    the estimate's error in bytes is affine in k too (a per-block error grows with the blocks, never hides)."""
    from peftplan.trace.run import trace

    full = load_card("llama-3.2-1b")
    plan = Plan(method="lora", r=8, targets="all-linear", batch_size=2, seq_len=128, grad_checkpointing=True)
    peaks, errs = {}, {}
    for k in (2, 3, 4, full.n_layers):
        card = cut(full, k)
        tr, est = trace(card, plan), estimate(card, plan)
        peaks[k] = {p.phase: p.peak_bytes for p in tr.phases}
        errs[k] = {m.phase: m.tensor_bytes - peaks[k][m.phase] for m in est.phases}
    L = full.n_layers
    for phase in peaks[L]:
        step = peaks[3][phase] - peaks[2][phase]
        assert peaks[4][phase] - peaks[3][phase] == step, phase
        assert peaks[2][phase] + (L - 2) * step == peaks[L][phase], phase
        estep = errs[3][phase] - errs[2][phase]
        assert errs[2][phase] + (L - 2) * estep == errs[L][phase], phase


def test_replay_commands_carry_no_idle_options():
    """A dense card's draw keeps the default MoE routing, an encoder's or T5's no shifted-logits copy: the
    printed command names only options the card uses (README "Off the grid")."""
    cmds = [(card, command(card, plan)) for card, plan in draws(200, 17)]
    assert not [c for card, c in cmds if "--moe-routing" in c and not card.moe]
    assert not [c for card, c in cmds if "--logits-shift-copy" in c and (card.encoder or card.cross_attention)]
    assert any("--moe-routing" in c for _, c in cmds) and any("--logits-shift-copy" in c for _, c in cmds)


@pytest.mark.parametrize("args, says", [
    (("--random", "0", "--seed", "7"), "--random must be at least 1, got 0"),
    (("--seed", "7"), "--seed applies only to a random draw"),
])
def test_check_random_bad_input_is_one_line(args, says):
    """`check --random 0` used to fall through to the whole default grid; `--seed` alone did the same."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "peftplan", "check", *args], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_trace_names_no_stale_module_after_checkpointed_recompute():
    """Non-reentrant checkpointing stops a block's recomputation early, so its modules' forward hooks never
    close: the loss and the optimizer step were attributed to the last recomputed Linear."""
    from peftplan.trace.run import trace

    card, plan = cut(load_card("llama-3.2-1b"), 1), Plan(method="adapter", grad_checkpointing=True,
                                                          batch_size=1, seq_len=64)
    tr = trace(card, plan)
    assert all(".mlp" not in p.module for p in tr.phases if p.phase in ("forward", "optimizer")), \
        [(p.phase, p.op, p.module) for p in tr.phases]
