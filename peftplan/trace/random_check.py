"""Random configurations for `peftplan check --random N --seed S`: the estimate held to the trace off the grid.

A draw picks a family, a card of it, a number of blocks k to keep, and then every field of `Plan` from its
domain below. Sizes stay small enough to trace in about a second: the card keeps its every width and its
vocabulary but only k of its blocks (`cut`).

Why a cut card checks the full card. Every block of a card has the same shapes, so the full step is the cut
step with L − k more identical blocks: the trace's live bytes at any phase peak are affine in the number of
blocks (a + b·L, `tests/test_check_random.py` measures this), and so are the estimate's terms (each is a per-block
quantity times a count of blocks, or a term outside the blocks). A per-block error therefore shows at every k
with the same sign and grows with k in bytes; a term outside the blocks (embeddings, logits, loss) weighs more
at small k than in the full card. Drawing k in 1..4 (plus some whole small cards) exposes both.

How an option opts in. Every field of `Plan` must have a domain in `DOMAINS` (a function of the random
generator and the card drawn), or be a bool (drawn True/False). A new Plan field without either makes
`draw_plan` raise and `tests/test_check_random.py::test_every_plan_field_is_drawn` fail, so a branch that
adds an option adds its domain here in the same change. The reproduce command is built from the fields too
(`--field-name VALUE`, `--flag/--no-flag`), so a new option appears in it with no further edit.
"""
from __future__ import annotations

import dataclasses
import random
import re
import shlex
from typing import Callable

from peftplan.errors import PlanError
from peftplan.plan import ATTENTIONS, AUTOCASTS, DTYPES, METHODS, OPTIMIZERS, PLACEMENTS, RELEVANT, Plan
from peftplan.planning.cards import ModelCard, registry
from peftplan.planning import families as family_terms, moe
from peftplan.planning.layout import layout
from peftplan.planning.params import count, lora_targets

MAX_BLOCKS = 4  # k is drawn in 1..MAX_BLOCKS for cards with more blocks
WHOLE_CARD_SHARE = 0.1  # this share of draws keeps every block of a card with at most 12 of them
MAX_SEQ = 1024
MOE_MAX_BLOCKS, MOE_MAX_BATCH, MOE_MAX_SEQ = 2, 2, 256  # an MoE block traces every expert: keep a draw ~seconds

Domain = Callable[[random.Random, ModelCard], object]


def families() -> dict[str, list[ModelCard]]:
    """Shipped cards grouped by transformers model_type, each group sorted by name: every card whose estimate
    carries no "approximate" warning (`approximate`; T5 is drawn without DoRA). Left out, and why: DeBERTa-v2
    (disentangled attention),
    ModernBERT (local/global attention), DeepSeek-V2 (multi-head latent attention, shared experts, dense first
    layers) and gpt-oss (experts with biases and their own gated activation)."""
    out: dict[str, list[ModelCard]] = {}
    for card in sorted(registry().values(), key=lambda c: c.name):
        if not approximate(card):
            out.setdefault(card.model_type, []).append(card)
    return out


def approximate(card: ModelCard) -> bool:
    """Whether the card's estimate warns that its activation or MoE memory is approximate
    (`families.warnings`, `moe.unmodelled`)."""
    from peftplan.planning import families as fam, moe

    return bool(fam.warnings(card)) or bool(card.moe and moe.unmodelled(card))


def traceable(plan: Plan) -> bool:
    """The CPU trace refuses reentrant checkpointing under autocast (it cannot enter the recomputation with
    CUDA's autocast emulation); such a draw is drawn again."""
    return not (plan.autocast != "none" and plan.grad_checkpointing and plan.use_reentrant)


def cut(card: ModelCard, k: int) -> ModelCard:
    """The card with only its first k blocks (every width, the vocabulary and the head unchanged)."""
    if not 1 <= k <= card.n_layers:
        raise PlanError(f"{card.name} has {card.n_layers} blocks; cannot keep {k}")
    if k == card.n_layers:
        return card
    if card.generated:  # the trace rebuilds the model from the config, cut by cardgen.cut_config (build.py)
        prefix = card.tree["block_prefix"] + "."
        kept = [e for e in card.tree["other"]  # entries of blocks that differ (DeepSeek-V2's MoE layers) past k go
                if not (e["name"].startswith(prefix) and int(e["name"][len(prefix):].split(".")[0]) >= k)]
        return dataclasses.replace(card, n_layers=k, tree=dict(card.tree, other=kept))
    return dataclasses.replace(card, n_layers=k)


def _targets(rng: random.Random, card: ModelCard) -> str | None:
    """peft's defaults, all-linear, a list of module names, or a regex over the block's full module names."""
    names = [x.name for x in layout(card).block_linears]
    kind = rng.choice(("default", "all-linear", "names", "regex"))
    if kind == "default":
        try:
            lora_targets(card, None)
            return None
        except PlanError:  # peft has no defaults for this model type (e.g. phi3)
            return "all-linear"
    if kind == "all-linear":
        return "all-linear"
    picked = sorted(rng.sample(names, rng.randint(1, len(names))), key=names.index)
    if kind == "names":
        return ",".join(dict.fromkeys(n.rsplit(".", 1)[-1] for n in picked))
    return "re:.*\\.(" + "|".join(re.escape(n) for n in picked) + ")"


def _fused_moe(card: ModelCard) -> bool:
    """An MoE card whose experts are 3-D parameters run by a grouped GEMM (Mixtral, Qwen3-MoE in transformers 5)."""
    from peftplan.planning.moe import fused_experts

    return bool(card.moe) and fused_experts(card)


def _seq(rng: random.Random, card: ModelCard) -> int:
    """Log-uniform in 8..1024 (odd lengths included), within the card's positions (max_positions 0: no table,
    no limit, as BLOOM's ALiBi)."""
    top = min(MAX_SEQ if not card.moe else MOE_MAX_SEQ, card.max_positions or MAX_SEQ)
    return min(top, int(round(2 ** rng.uniform(3, 10))))


DOMAINS: dict[str, Domain] = {
    "method": lambda rng, card: rng.choice(METHODS),
    "r": lambda rng, card: rng.choice((1, 2, 4, 8, 16, 32, 64, 128, 256)),
    "alpha": lambda rng, card: rng.choice((8.0, 16.0, 32.0)),
    # peft's ParamWrapper on fused experts refuses lora_dropout != 0 (peft/tuners/lora/layer.py)
    "dropout": lambda rng, card: 0.0 if _fused_moe(card) else rng.choice((0.0, 0.0, 0.05, 0.1)),
    "targets": _targets,
    "adapter_size": lambda rng, card: rng.choice((8, 16, 32, 64, 128, 256)),
    "adapter_placement": lambda rng, card: rng.choice(PLACEMENTS),
    "top_k": lambda rng, card: rng.randint(1, card.n_layers),
    "batch_size": lambda rng, card: rng.randint(1, MOE_MAX_BATCH if card.moe else 8),
    "seq_len": _seq,
    # the grouped-GEMM experts take bf16 operands only ("Expected inputs of BF16 type", seen in the trace)
    "dtype": lambda rng, card: "bf16" if _fused_moe(card) else rng.choice(tuple(DTYPES)),
    "optimizer": lambda rng, card: rng.choice(OPTIMIZERS),
    # transformers 5 has no SDPA path for Gemma-2, gpt-oss (families.EAGER_ONLY_FAMILIES)
    "attention": lambda rng, card: "eager" if family_terms.eager_only(card) else rng.choice(ATTENTIONS),
    # the stack users run (peft's fp32 adapters, the Trainer's autocast, accumulation, clipping)
    "adapter_dtype": lambda rng, card: rng.choice(("fp32", "fp32", "bf16", "fp16")),
    "autocast": lambda rng, card: "none" if _fused_moe(card) else rng.choice(AUTOCASTS),
    "grad_accum": lambda rng, card: rng.choice((1, 1, 2, 4)),
    "max_grad_norm": lambda rng, card: rng.choice((0.0, 1.0, 1.0)),
    # drawn on every card (one random number, so a seed draws the same list), kept only where the card uses it:
    # the routing on MoE cards, transformers ≤ 4.48's shifted-logits copy on causal LMs (not encoders, not T5)
    "moe_routing": lambda rng, card: rng.choice(("balanced", "worst")) if card.moe else _skip(rng.choice, "balanced",
                                                                                          ("balanced", "worst")),
    "logits_shift_copy": lambda rng, card: rng.random() < 0.5 and not (card.encoder or card.cross_attention),
    # DoRA (peft's use_dora) on a quarter of the draws; Plan refuses it for the methods other than LoRA/QLoRA,
    # and such a draw is drawn again
    # ParamWrapper refuses DoRA; DoRA on T5's encoder is not modelled (families.warnings)
    "use_dora": lambda rng, card: not _fused_moe(card) and not card.cross_attention and rng.random() < 0.25,
    # one GPU: the FSDP2 trace on a fake process group has its own check (benchmarks/check_distributed.py)
    "gpus": lambda rng, card: 1,
    "nodes": lambda rng, card: 1,
    "strategy": lambda rng, card: "none",
    "offload": lambda rng, card: "none",
    "reduce_bucket_size": lambda rng, card: 500_000_000,
    "allgather_bucket_size": lambda rng, card: 500_000_000,
    "stage3_prefetch_bucket_size": lambda rng, card: 50_000_000,
    "stage3_max_live_parameters": lambda rng, card: 1_000_000_000,
}
# Fields held at one value in the draw, and why (the test of the draw's coverage skips them)
FIXED = {
    "gpus": "one GPU: the FSDP2 trace has its own check (benchmarks/check_distributed.py)",
    "nodes": "one GPU", "strategy": "one GPU", "offload": "one GPU", "reduce_bucket_size": "one GPU",
    "allgather_bucket_size": "one GPU", "stage3_prefetch_bucket_size": "one GPU",
    "stage3_max_live_parameters": "one GPU",
}
# trace's option names where they differ from Plan's field names
FLAGS = {"use_dora": "dora"}
DRAW_TRIES = 100  # fields are drawn independently; a combination Plan refuses (e.g. bf16 autocast over fp16
# weights) is drawn again


def _skip(draw: Callable, default, *args):
    """Consume `draw(*args)` (the seed's sequence stays the same) and return `default`."""
    draw(*args)
    return default


def draw_plan(rng: random.Random, card: ModelCard) -> Plan:
    """Every Plan field from its domain (bools: a coin). Raises PlanError for a field with no domain."""
    for _ in range(DRAW_TRIES):
        values = {}
        for f in dataclasses.fields(Plan):
            if f.name in DOMAINS:
                values[f.name] = DOMAINS[f.name](rng, card)
            elif f.type in (bool, "bool"):
                values[f.name] = rng.random() < 0.5
            else:
                raise PlanError(f"Plan field '{f.name}' has no random domain: add one to "
                                "peftplan.trace.random_check.DOMAINS")
        try:
            plan = Plan(**values)
            default = Plan()
            plan = dataclasses.replace(plan, **{f: getattr(default, f) for f, keep in RELEVANT.items()
                                                if f in values and not keep(plan)})
            moe.refuse(card, plan)  # what the estimate refuses on this card (QLoRA's k-bit prep on fused experts)
            count(card, plan)  # and its parameter checks (regex targets on the MoE types peft rewrites)
            if plan.method == "adapter":  # the trace refuses adapters where no FFN output Linear exists (Qwen3-MoE)
                from peftplan.inject import adapter_sites  # torch: imported only when drawing

                adapter_sites(card)
        except PlanError:
            continue
        if traceable(plan):
            return plan
    raise PlanError(f"no valid plan in {DRAW_TRIES} draws: a domain of peftplan.trace.random_check is too wide")


def draw(rng: random.Random) -> tuple[ModelCard, Plan]:
    """One (card, plan): a family, a card of it, k blocks, then the plan."""
    fams = families()
    card = rng.choice(fams[rng.choice(sorted(fams))])
    if card.n_layers <= 12 and rng.random() < WHOLE_CARD_SHARE:
        k = card.n_layers
    else:
        k = rng.randint(1, min(MOE_MAX_BLOCKS if card.moe else MAX_BLOCKS, card.n_layers))
    card = cut(card, k)
    return card, draw_plan(rng, card)


def draws(n: int, seed: int) -> list[tuple[ModelCard, Plan]]:
    """n configurations from one seed (the same seed gives the same list)."""
    return [(card, plan) for _, card, plan in indexed_draws(n, seed)]


def indexed_draws(n: int, seed: int) -> list[tuple[int, ModelCard, Plan]]:
    """n (i, card, plan) from one seed: i counts every draw, those skipped too. A plan the estimate itself calls
    approximate (families.warnings: T5's checkpointed top-k) is skipped after it is drawn, so skipping changes
    none of the other draws of the seed."""
    from peftplan.planning.families import warnings as family_warnings

    rng, out, i = random.Random(seed), [], 0
    while len(out) < n:
        card, plan = draw(rng)
        if not any("approximate" in w for w in family_warnings(card, plan)):
            out.append((i, card, plan))
        i += 1
    return out


def blocks_of(card: ModelCard) -> int:
    """The card's block count as shipped (a cut card keeps its name)."""
    return registry()[card.name].n_layers if card.name in registry() else card.n_layers


def command(card: ModelCard, plan: Plan) -> str:
    """The `peftplan trace` command that reproduces one configuration, built from Plan's fields."""
    args = ["peftplan", "trace", "--model", card.name]
    if card.n_layers != blocks_of(card):
        args += ["--n-layers", str(card.n_layers)]
    default = Plan()
    for f in dataclasses.fields(Plan):
        v = getattr(plan, f.name)
        if v == getattr(default, f.name):
            continue
        name = FLAGS.get(f.name, f.name).replace("_", "-")
        flag = "--" + name
        if isinstance(v, bool):
            args.append(flag if v else "--no-" + name)
        elif v is not None:
            args += [flag, str(v)]
    return " ".join(shlex.quote(a) for a in args)


def check(configs: list[tuple[ModelCard, Plan]], on_result: Callable | None = None):
    """Estimate vs trace for each configuration: (comparisons, failures), failures as 'command: reason'.

    on_result(i, card, plan, comparison_or_None, reason_or_None) is called after each, for progress.
    """
    from peftplan.planning import estimate
    from peftplan.trace.check import compare
    from peftplan.trace.run import trace

    results, failures = [], []
    for i, (card, plan) in enumerate(configs):
        try:
            c = compare(estimate(card, plan), trace(card, plan))
        except PlanError as e:
            failures.append(f"{command(card, plan)}: {e}")
            if on_result:
                on_result(i, card, plan, None, str(e))
            continue
        results.append((card, c))
        if on_result:
            on_result(i, card, plan, c, None)
    return results, failures
