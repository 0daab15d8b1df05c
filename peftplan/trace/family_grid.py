"""The check grid of the generated cards' families: a list of (card, options), each traced and estimated.

Every entry is `Config(card, n_layers, options)`: a shipped card, cut to its first `n_layers` blocks (0: the
whole card; cut cards keep every width and the vocabulary, and the peaks are affine in the number of blocks,
`tests/test_check_random.py`), and the `Plan` fields that differ from the defaults. `benchmarks/check_families.py`
runs them all; `tests/test_families.py` a sample. A new family or feature adds entries to `CONFIGS` (or a list
of its own concatenated to it); nothing else changes.

The families and what each exercises (peftplan/planning/families.py):
    Qwen3, OLMo-2, Gemma-3      q/k norms (per head; OLMo-2 over the whole projection), fp32-scaled norms
    Gemma-3                     sliding-window layers (s > W: SDPA's additive masks), four norms per block
    Phi-4, Pythia               fused qkv (views kept by SDPA), rotary by concatenation; Phi-4 fused gate_up
    Pythia                      parallel attention + MLP with two norms of one input
    Falcon                      multi-query attention through SDPA's math path (its eager path too), parallel
                                block, one norm
    Mistral-Nemo/Small, SmolLM2, TinyLlama, Llama-3.3   the Llama block through generated cards
    ModernBERT                  masked LM: fp32-logit loss, bias-free LayerNorms, chunked GLU, no attention norm
                                in block 0, bidirectional sliding-window masks (s >= 64)
    DeBERTa-v3                  masked LM, eager disentangled attention (c2p/p2c against P relative positions)
    BLOOM                       ALiBi (a (b·h, 1, s) bias per batch, baddbmm into the scores), fused qkv, a fp32
                                softmax; eager only (BloomForCausalLM has no SDPA path in transformers 5.24)
    GPT-J                       parallel attention + MLP reading one LayerNorm, interleaved partial rotary (q, k
                                cut and concatenated), eager attention on fp32 copies of q and k
    Flan-T5                     encoder-decoder (planning/seq2seq.py): the whole encoder on decoder cuts,
                                cross-attention, relative position bias, dropout masks, QLoRA with wo unquantized
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from peftplan.plan import Plan
from peftplan.planning.cards import ModelCard, registry


@dataclass(frozen=True)
class Config:
    card: str
    n_layers: int = 2  # 0: every block
    options: dict = field(default_factory=dict, hash=False)

    def label(self) -> str:
        opts = " ".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.card}[{self.n_layers or 'all'}] {opts}"


METHODS = ("full", "adapter", "lora", "qlora")


def _product(cards, n_layers=2, methods=METHODS, gcs=(False, True), shapes=((2, 256),), **fixed) -> list[Config]:
    out = []
    for card, method, gc, (b, s) in itertools.product(cards, methods, gcs, shapes):
        opts = dict(method=method, batch_size=b, seq_len=s, grad_checkpointing=gc, **fixed)
        if method in ("lora", "qlora"):
            opts.setdefault("targets", "all-linear")  # peft has no default targets for phi3, olmo2
            opts.setdefault("r", 16)
        out.append(Config(card, n_layers, opts))
    return out


DENSE = (
    # every method × checkpointing on 2-block cuts of the most used cards
    _product(["qwen3-0.6b", "qwen3-8b", "gemma-3-1b", "gemma-3-4b", "phi-4", "mistral-nemo-12b", "olmo-2-7b",
              "smollm2-135m", "falcon-7b", "pythia-1b"])
    # other batch × sequence points (b = 1 keeps Falcon's k, v as views; s = 1024 passes Gemma-3's window)
    + _product(["qwen3-1.7b", "gemma-3-1b", "falcon-7b", "pythia-1b", "olmo-2-7b"], methods=("lora", "qlora"),
               gcs=(False,), shapes=((1, 1024), (4, 128)))
    + _product(["mistral-small-24b", "smollm2-360m", "tinyllama-1.1b", "llama-3.3-70b", "qwen3-14b"],
               n_layers=3, methods=("full", "lora"), gcs=(False, True), shapes=((1, 512),))
    # peft's default targets where it has them, LoRA ranks, 3-block cuts
    + [Config(c, 3, dict(method="lora", r=r, batch_size=2, seq_len=256))
       for c in ("qwen3-0.6b", "gemma-3-1b", "pythia-1b", "falcon-7b") for r in (8, 64)]
    # eager attention (the b·h·s² probabilities; Gemma-3 past its window adds the sliding mask to the scores;
    # Falcon's own eager path keeps one kv head and a softmax in the compute dtype)
    + _product(["qwen3-0.6b", "olmo-2-7b", "phi-4", "pythia-1b", "falcon-7b"], methods=("lora", "qlora"),
               gcs=(False,), attention="eager")
    + _product(["gemma-3-1b"], methods=("lora", "qlora"), gcs=(False,), shapes=((1, 1024),), attention="eager")
    # whole small cards
    + _product(["smollm2-135m", "qwen3-0.6b"], n_layers=0, methods=("lora", "qlora", "adapter"), gcs=(False,),
               shapes=((2, 256),))
)

ENCODERS = (
    # ModernBERT (masked LM): LayerNorms without bias, chunked GLU, fused Wqkv with an fp32 rotary copy, local
    # layers past their window (s >= 64: a bidirectional sliding mask), no attention norm in block 0, an MLM loss
    # on fp32 logits; s = 32 keeps every layer mask-free
    _product(["modernbert-base"], shapes=((2, 256),))
    + _product(["modernbert-base"], n_layers=3, methods=("full", "lora", "adapter"), shapes=((1, 1024), (4, 32)))
    + [Config("modernbert-base", 4, dict(method="lora", r=r, targets="Wqkv,Wo", batch_size=2, seq_len=512))
       for r in (8, 64)]
    + _product(["modernbert-base"], n_layers=0, methods=("lora", "full"), gcs=(False,), shapes=((2, 512),))
    # DeBERTa-v3 (eager only: DebertaV2ForMaskedLM has no SDPA path): disentangled c2p/p2c scores against
    # P = 512 relative positions, the relative embeddings' projections, attention and hidden dropout
    + _product(["deberta-v3-base"], attention="eager")
    + _product(["deberta-v3-base"], n_layers=3, methods=("full", "lora", "adapter"), gcs=(False,),
               shapes=((1, 512), (4, 128)), attention="eager")
    + [Config("deberta-v3-base", 2, dict(method="lora", r=r, batch_size=2, seq_len=256, attention="eager"))
       for r in (8, 64)]
    + _product(["deberta-v3-base"], n_layers=0, methods=("lora", "full"), gcs=(False,), shapes=((4, 512),),
               attention="eager")
)

CONFIGS: list[Config] = list(DENSE) + list(ENCODERS)


def resolve(config: Config) -> tuple[ModelCard, Plan]:
    """(cut card, plan) for one entry."""
    from peftplan.trace.random_check import cut

    card = registry()[config.card]
    if config.n_layers:
        card = cut(card, config.n_layers)
    return card, Plan(**config.options)

# Encoder–decoder (Flan-T5, `planning/seq2seq.py`): cuts keep the whole encoder and k decoder blocks; both stacks
# read s tokens. Every method × checkpointing, LoRA on peft's default targets (q, v) and all-linear, r ∈ {8, 64},
# other batch × sequence points, fp32 weights, the whole base card, eager attention, autocast
SEQ2SEQ = (
    _product(["flan-t5-base"], methods=("full", "adapter", "lora", "qlora", "top"), top_k=1)
    + _product(["flan-t5-large"], n_layers=1, methods=("full", "adapter", "lora", "qlora"))
    + [Config(c, 2, dict(method="lora", r=r, batch_size=2, seq_len=256, grad_checkpointing=gc))
       for c in ("flan-t5-base", "flan-t5-large") for r in (8, 64) for gc in (False, True)]
    + _product(["flan-t5-base"], methods=("lora", "full", "adapter"), gcs=(False,), shapes=((1, 512), (4, 128)))
    + _product(["flan-t5-base"], methods=("lora", "full"), gcs=(False, True), dtype="fp32")
    + _product(["flan-t5-base"], n_layers=0, methods=("lora",), gcs=(False,), shapes=((2, 128),))
    # T5's own eager attention (q, kᵀ, v copies, b·h·s² probabilities, attention dropout)
    + _product(["flan-t5-base"], n_layers=1, gcs=(False,), shapes=((2, 128),), attention="eager")
    # the Trainer's autocast over fp32 weights (fp32 stream and gelu_new's pow, the encoder's weight copies)
    + _product(["flan-t5-base"], n_layers=1, methods=("full", "adapter", "lora", "top"), shapes=((2, 128),),
               dtype="fp32", autocast="bf16", top_k=1)
)

CONFIGS += list(SEQ2SEQ)

# BLOOM (ALiBi, eager only) and GPT-J (parallel block, one norm, interleaved rotary; SDPA and eager): every method
# × checkpointing on 1–2 block cuts, peft's default targets (BLOOM: query_key_value; GPT-J: q_proj, v_proj) and
# all-linear, fp32 weights and the Trainer's bf16 autocast over them (b ≤ 2, s ≤ 256)
ALIBI_PARALLEL = (
    _product(["bloom-560m"], n_layers=2, attention="eager")
    + _product(["gpt-j-6b"], n_layers=1)
    + _product(["gpt-j-6b"], n_layers=1, methods=("lora", "qlora", "adapter"), gcs=(False,), attention="eager")
    + [Config(c, 2, dict(method="lora", r=8, batch_size=2, seq_len=256, grad_checkpointing=gc, **extra))
       for c, extra in (("bloom-560m", dict(attention="eager")), ("gpt-j-6b", {})) for gc in (False, True)]
    + _product(["bloom-560m"], n_layers=1, methods=("lora", "full"), gcs=(False,), shapes=((1, 128),),
               attention="eager", dtype="fp32")
    + _product(["bloom-560m", "gpt-j-6b"], n_layers=1, methods=("lora", "full"), gcs=(False,), shapes=((2, 128),),
               attention="eager", dtype="fp32", autocast="bf16")
    + _product(["gpt-j-6b"], n_layers=1, methods=("lora",), gcs=(False, True), shapes=((2, 128),), dtype="fp32",
               autocast="bf16")
)

CONFIGS += list(ALIBI_PARALLEL)
