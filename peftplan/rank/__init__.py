"""The rank advisor (`peftplan rank`): the LoRA paper's subspace similarity φ between two adapters trained at
ranks r1 < r2 (Hu et al. 2021, §7.2), the rank that captures what the larger one learns, and what it saves.

    from peftplan.rank import analyse_ranks
    result = analyse_ranks("out/r8", "out/r64")  # RankAnalysis: .kinds, .modules, .recommended_r, .memory

Modules: `phi` (the math, numpy), `adapters` (reading peft adapters with safetensors), `analyse` (pairing,
summaries, memory saved), `html` (the φ heatmaps), `cli`. Names load on first use, so `peftplan.rank.cli`
stays cheap to import on every CLI start.
"""
from __future__ import annotations

_NAMES = {"analyse_ranks": "analyse", "RankAnalysis": "analyse", "read_adapter": "adapters",
          "render_rank_html": "html"}
__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        import importlib

        return getattr(importlib.import_module(f"peftplan.rank.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'peftplan.rank' has no attribute '{name}'")
