"""peftplan: memory and cost planner and profiler for full fine-tuning, Adapters, LoRA and QLoRA.

The planning API imports no torch: `peftplan.estimate("opt-6.7b", method="qlora", r=16)`.
"""
from peftplan.errors import PlanError
from peftplan.planning import estimate
from peftplan.plan import Plan

__version__ = "0.1.0"
__all__ = ["Plan", "PlanError", "estimate", "__version__"]
