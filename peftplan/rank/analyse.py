"""`analyse_ranks()`: φ per module for two LoRA adapters of one base model, a rank per module kind, the memory saved.

The rule (documented in README, "Choosing r"):
- a layer's captured rank is the largest i with φ(i', i') > threshold for all i' ≤ i (`phi.captured_rank`);
- "most layers": the largest k that more than half of a kind's layers reach (`phi.majority_rank`);
- the kind's recommended r: the smallest power of two ≥ k, capped at r1; r2 if k = 0 (`phi.recommend_r`);
- the adapter's recommended r: the largest over its kinds (peft's `r` is one number; per kind it is
  `rank_pattern`, which the per-kind values give).
The memory saved is the planner's estimate for the base model at r2 minus at the recommended r.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from peftplan.errors import PlanError
from peftplan.plan import Plan
from peftplan.rank import phi as phimath
from peftplan.rank.adapters import LoraAdapter, LoraModule, read_adapter

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ModulePhi:
    """φ(i, j) of one targeted module: `phi[i-1][j-1]`, 1 ≤ i ≤ r1, 1 ≤ j ≤ r2."""

    module: str
    kind: str
    layer: int | None
    d_in: int
    phi: tuple[tuple[float, ...], ...]
    captured_rank: int  # largest i with φ(i', i') > threshold for all i' ≤ i

    @property
    def diagonal(self) -> tuple[float, ...]:
        return tuple(self.phi[i][i] for i in range(min(len(self.phi), len(self.phi[0]))))


@dataclass(frozen=True)
class KindSummary:
    """One module kind (q_proj, v_proj, ...) over its layers."""

    kind: str  # module path with '*' for the layer index
    name: str  # short display name: "self_attn.q_proj"
    layers: tuple[int | None, ...]
    d_in: int
    captured_ranks: tuple[int, ...]  # per layer, in `layers` order
    captured_rank: int  # reached by more than half of the layers
    recommended_r: int
    median_diagonal: tuple[float, ...]  # median over layers of φ(i, i), i = 1..r1
    random_diagonal: tuple[float, ...]  # the random-subspace baseline φ(i, i) = i/d_in


@dataclass(frozen=True)
class RankMemory:
    """The planner's estimate for the base model at r1, r2 and the recommended r (same plan otherwise)."""

    model: str
    plan: Plan  # the plan at the recommended r
    trainable_params: tuple[int, int, int]  # at (r1, r2, recommended)
    peak_bytes: tuple[int, int, int]  # device peak (NVML view) at (r1, r2, recommended)
    adapter_params: int  # LoRA parameters actually in the smaller adapter, to compare with trainable_params[0]

    @property
    def saved_bytes(self) -> int:
        """Peak device memory the recommendation saves against r2."""
        return self.peak_bytes[1] - self.peak_bytes[2]

    @property
    def saved_params(self) -> int:
        return self.trainable_params[1] - self.trainable_params[2]


@dataclass(frozen=True)
class RankAnalysis:
    adapter_1: str  # the smaller rank's adapter
    adapter_2: str
    r1: int
    r2: int
    threshold: float
    base_model: str | None
    kinds: tuple[KindSummary, ...]
    modules: tuple[ModulePhi, ...]
    recommended_r: int
    memory: RankMemory | None
    notes: tuple[str, ...] = ()
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.memory is not None:
            d["memory"]["saved_bytes"] = self.memory.saved_bytes
            d["memory"]["saved_params"] = self.memory.saved_params
        d["rule"] = ("captured rank of a layer: largest i with phi(i',i') > threshold for all i' <= i; kind: the "
                     "largest rank reached by more than half of its layers; recommended r: smallest power of two "
                     ">= that rank, capped at r1 (r2 if 0); adapter: the largest over kinds")
        return d


# ---------------------------------------------------------------- pairing two adapters


def _one_rank(ad: LoraAdapter) -> int:
    if len(ad.ranks) != 1:
        raise PlanError(f"'{ad.path}': r varies by module ({', '.join(map(str, ad.ranks))}; a rank_pattern): "
                        "compare adapters with one r each")
    return ad.ranks[0]


def _few(names) -> str:
    names = sorted(names)
    return ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")


def _same_base(x: LoraAdapter, y: LoraAdapter) -> None:
    if x.base_model is None or y.base_model is None or x.base_model == y.base_model:
        return
    px, py = Path(x.base_model), Path(y.base_model)
    if px.exists() and py.exists() and px.resolve() == py.resolve():
        return
    raise PlanError(f"mismatched base models: '{x.base_model}' and '{y.base_model}'")


def check_pair(x: LoraAdapter, y: LoraAdapter) -> tuple[LoraAdapter, LoraAdapter]:
    """The two adapters ordered (smaller r first), after checking they can be compared.

    Raises PlanError for different base models, different target kinds, modules missing from one, different
    input/output sizes at one module, equal ranks, or a rank that varies by module.
    """
    _same_base(x, y)
    kx, ky = {m.kind for m in x.modules}, {m.kind for m in y.modules}
    if kx != ky:
        raise PlanError(f"different targets: only in '{x.path}': {_few(kx - ky) or '-'}; "
                        f"only in '{y.path}': {_few(ky - kx) or '-'}")
    mx, my = {m.module: m for m in x.modules}, {m.module: m for m in y.modules}
    if mx.keys() != my.keys():
        gone = [(x.path, my.keys() - mx.keys()), (y.path, mx.keys() - my.keys())]
        raise PlanError("; ".join(f"modules missing from '{p}': {_few(s)}" for p, s in gone if s))
    for name, a in mx.items():
        b = my[name]
        if (a.d_in, a.d_out) != (b.d_in, b.d_out):
            raise PlanError(f"mismatched shapes at '{name}': {a.d_out}×{a.d_in} and {b.d_out}×{b.d_in} "
                            "(adapters of different base models?)")
    rx, ry = _one_rank(x), _one_rank(y)
    if rx == ry:
        raise PlanError(f"both adapters have r = {rx}: φ compares two different ranks (r1 < r2)")
    return (x, y) if rx < ry else (y, x)


# ---------------------------------------------------------------- φ and the summaries


def display_names(kinds: list[str]) -> dict[str, str]:
    """The part after the layer index ("self_attn.q_proj"), or the whole kind where that is ambiguous."""
    short = {k: k.rsplit("*.", 1)[-1] for k in kinds}
    clash = {s for s in short.values() if list(short.values()).count(s) > 1}
    return {k: (k if s in clash else s) for k, s in short.items()}


def module_phis(small: LoraAdapter, large: LoraAdapter, threshold: float) -> tuple[ModulePhi, ...]:
    """φ of every module (r1 × r2 each) and its captured rank, in `small.modules` order."""
    # one BLAS thread: the matrices are thin (r rows), and OpenBLAS threads on a busy machine spin for
    # ~100× longer than the work (measured here: 4.4 s instead of 0.06 s for one 64×4096 SVD)
    with threadpool_limits(limits=1, user_api="blas"):
        return tuple(_module_phi(m, small, large, threshold) for m in small.modules)


def _module_phi(m: LoraModule, small: LoraAdapter, large: LoraAdapter, threshold: float) -> ModulePhi:
    p = phimath.phi(small.a[m.module], large.a[m.module])
    return ModulePhi(module=m.module, kind=m.kind, layer=m.layer, d_in=m.d_in, phi=tuple(map(tuple, p.tolist())),
                     captured_rank=phimath.captured_rank(np.diagonal(p), threshold))


def summarise(modules: tuple[ModulePhi, ...], r1: int, r2: int) -> tuple[KindSummary, ...]:
    """One summary per module kind: captured rank in most layers, recommended r, median and random φ(i, i)."""
    by_kind: dict[str, list[ModulePhi]] = {}
    for m in modules:
        by_kind.setdefault(m.kind, []).append(m)
    names = display_names(list(by_kind))
    out = []
    for kind, ms in by_kind.items():
        ranks = tuple(m.captured_rank for m in ms)
        k = phimath.majority_rank(ranks)
        diag = np.median(np.array([m.diagonal for m in ms]), axis=0)
        d_in = ms[0].d_in
        out.append(KindSummary(
            kind=kind, name=names[kind], layers=tuple(m.layer for m in ms), d_in=d_in, captured_ranks=ranks,
            captured_rank=k, recommended_r=phimath.recommend_r(k, r1, r2),
            median_diagonal=tuple(diag.tolist()),
            random_diagonal=tuple(np.diagonal(phimath.random_baseline(r1, r1, d_in)).tolist())))
    return tuple(out)


# ---------------------------------------------------------------- the base model and the memory saved


def find_base_card(small: LoraAdapter, large: LoraAdapter, model: str | None):
    """The base model's card: `model` if given, else a config.json beside either adapter, else the adapters'
    base_model_name_or_path (a local path, a card name, or a Hub id matched to a card's source URL).
    Returns (card or None, note when unknown). Raises PlanError only for a bad explicit `model`."""
    from peftplan.planning.cards import card_for_hub_id, load_card, registry

    if model is not None:
        return load_card(model), None
    for ad in (small, large):
        if ad.config_dir and (Path(ad.config_dir) / "config.json").is_file():
            return load_card(str(Path(ad.config_dir) / "config.json")), None
    base = small.base_model or large.base_model
    if base is None:
        return None, "base model unknown (no adapter_config.json): pass --model for the memory saved"
    path = Path(base)
    try:
        if path.is_dir() or path.is_file():
            return load_card(base), None
        cards = registry()
        shipped = card_for_hub_id(base)
        if shipped is not None:
            return cards[shipped], None
        for name in (base, base.rsplit("/", 1)[-1].lower()):
            if name in cards:
                return cards[name], None
    except PlanError as e:
        return None, f"base model '{base}' not read ({e}): pass --model for the memory saved"
    return None, f"base model '{base}' has no card here: pass --model (a card or config.json) for the memory saved"


def memory_saved(card, small: LoraAdapter, r1: int, r2: int, recommended: int, plan: Plan) -> RankMemory:
    """The estimate at r1, r2 and the recommended r for the adapters' targets on `card`."""
    from peftplan.planning import estimate

    targets = ",".join(sorted({m.module.rsplit(".", 1)[-1] for m in small.modules}))
    ests = [estimate(card, plan.with_(r=r, targets=targets)) for r in (r1, r2, recommended)]
    return RankMemory(model=card.name, plan=ests[2].plan,
                      trainable_params=tuple(e.params.trainable for e in ests),
                      peak_bytes=tuple(e.peak_bytes for e in ests),
                      adapter_params=sum(m.r * (m.d_in + m.d_out) for m in small.modules))


# ---------------------------------------------------------------- the whole analysis


def analyse_ranks(adapter_a: str | Path, adapter_b: str | Path, threshold: float = 0.5, model: str | None = None,
                  plan: Plan | None = None) -> RankAnalysis:
    """Compare two LoRA adapters of one base model trained at different ranks (Hu et al. 2021, §7.2).

    adapter_a, adapter_b: peft adapter folders or safetensors files, in either order (the smaller r is r1).
    threshold: φ(i, i) above it counts as a shared direction, 0 < threshold < 1.
    model: the base model (card name or config.json) for the memory saved; found from the adapters if None.
    plan: the training step the memory is estimated for (method lora or qlora; r and targets are set here).
    Raises PlanError for bad input (see `read_adapter` and `check_pair`).
    """
    if not 0.0 < threshold < 1.0:
        raise PlanError(f"threshold must be in (0, 1), got {threshold:g}")
    plan = plan or Plan(method="lora")
    if not plan.uses_lora:
        raise PlanError(f"the memory saved is estimated for lora or qlora, not '{plan.method}'")
    small, large = check_pair(read_adapter(adapter_a), read_adapter(adapter_b))
    r1, r2 = small.ranks[0], large.ranks[0]
    modules = module_phis(small, large, threshold)
    kinds = summarise(modules, r1, r2)
    recommended = max(k.recommended_r for k in kinds)
    notes = []
    card, note = find_base_card(small, large, model)
    memory = None
    if note:
        notes.append(note)
    if card is not None:
        try:
            memory = memory_saved(card, small, r1, r2, recommended, plan)
        except PlanError as e:
            notes.append(f"memory not estimated for '{card.name}': {e}")
        if memory is not None and memory.trainable_params[0] != memory.adapter_params:
            notes.append(f"the adapter holds {memory.adapter_params:,} LoRA parameters but '{card.name}' with these "
                         f"targets at r = {r1} has {memory.trainable_params[0]:,}: is it the base model?")
    if all(k.captured_rank == 0 for k in kinds):
        notes.append(f"no direction is shared above φ = {threshold:g} in most layers: nothing shows r1 = {r1} "
                     f"learns what r2 = {r2} does (train longer, or compare against the random baseline)")
    base = card.name if card is not None else (small.base_model or large.base_model)
    return RankAnalysis(adapter_1=small.path, adapter_2=large.path, r1=r1, r2=r2, threshold=threshold,
                        base_model=base, kinds=kinds, modules=modules, recommended_r=recommended, memory=memory,
                        notes=tuple(notes))
