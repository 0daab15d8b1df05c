"""Real training steps: build a model with the plan injected, run the shared step, count what it holds.

Imports torch and transformers; the planning path never imports this package.
"""
from peftplan.measure.count import ModelCount, count_model
from peftplan.measure.step import (StepRun, build_model, make_batch, make_optimizer, materialize, run_steps,
                                   train_step)

__all__ = ["ModelCount", "StepRun", "build_model", "count_model", "make_batch", "make_optimizer", "materialize",
           "run_steps", "train_step"]
