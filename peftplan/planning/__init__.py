"""The planning tier: cards, module layouts, exact parameter accounting, the analytic memory and time models,
and fit searches. Pure Python: nothing here imports torch (the trace tier, `peftplan.trace`, and the profile
tier, `peftplan.profile`, hold the estimate to the real step).

    cards    model cards (profiles/models/*.toml, config.json)     layout   module names and shapes per card
    params   parameter accounting per method                       memory   per-phase peak memory by component
    flops    exact matmul FLOPs of one step per plan               timing   roofline step time and cost
    gpus     GPU cards (profiles/gpus/*.toml)                       fit      what fits where, ranked by cost
    api      `estimate()`
"""
from peftplan.planning.api import estimate

__all__ = ["estimate"]
