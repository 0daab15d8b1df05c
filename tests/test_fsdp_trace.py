"""FSDP2 on a fake process group: our trace against PyTorch's FSDPMemTracker, and the estimate against the trace.

Cards cut to 2 blocks: each block is its own FSDP unit of the same shape, so what sharding adds (one unit
unsharded, the root, per-block gradients and states) is exact per block; the full grid is in
benchmarks/check_distributed.py.
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from peftplan.plan import Plan  # noqa: E402
from peftplan.planning import estimate  # noqa: E402
from peftplan.planning.cards import load_card  # noqa: E402


def cut(model: str, blocks: int = 2):
    return replace(load_card(model), n_layers=blocks)


def test_trace_equals_fsdp_mem_tracker():
    """PyTorch's own FSDP2 memory tracker, on the same fake step, sees the same peak as our counter."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    from peftplan.measure.step import build_model, make_batch, make_optimizer, train_step
    from peftplan.trace.distributed import close, fake_world, shard
    from peftplan.trace.run import _blocks, cuda_like, trace

    card = cut("qwen2.5-0.5b")
    plan = Plan(method="lora", gpus=4, strategy="fsdp", batch_size=1, seq_len=128)
    ours = trace(card, plan, steps=2).peak_bytes
    mesh = fake_world(plan)  # outside the FakeTensorMode: the mesh reads rank lists
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        model, _ = build_model(card, plan, "cpu")
        shard(model, plan, mesh, _blocks(model, card))
        batch = make_batch(card, plan, "cpu")
        optimizer = make_optimizer(model, plan)
    try:
        with cuda_like(), mode:
            train_step(model, batch, optimizer, plan)  # step 1 creates the optimizer states
            tracker = FSDPMemTracker(model, optimizer)
            tracker.track_inputs(tuple(batch.values()))
            with tracker:
                train_step(model, batch, optimizer, plan)
            snap = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    finally:
        close()
    theirs = snap["Total"]
    assert snap[next(k for k in snap if getattr(k, "value", "") == "All Gather")] > 0  # it saw FSDP's buffers
    assert abs(ours - theirs) / theirs < 1e-3  # both round per tensor, differently


@pytest.mark.parametrize("model,method,strategy,gpus,nodes,ckpt", [
    ("qwen2.5-0.5b", "full", "fsdp", 2, 1, False),
    ("llama-3.2-1b", "lora", "fsdp-grad-op", 4, 1, False),
])
def test_estimate_within_3pct_of_fsdp2_trace(model, method, strategy, gpus, nodes, ckpt):
    from peftplan.trace.run import trace

    card = cut(model)
    plan = Plan(method=method, gpus=gpus, nodes=nodes, strategy=strategy, batch_size=1, seq_len=128,
                grad_checkpointing=ckpt)
    tr = trace(card, plan, steps=2)
    est = estimate(card, plan)
    assert abs(est.peak.tensor_bytes - tr.peak_bytes) / tr.peak_bytes < 0.03
    # the gathered units and reduce-scatter buffers, tagged in the trace, are what the estimate calls communication
    by_phase = {m.phase: m for m in est.phases}
    traced = tr.peak.by_category_bytes.get("communication", 0)
    assert traced > 0
    assert abs(by_phase[tr.peak.phase].communication_bytes - traced) / traced < 0.03


def test_trace_cli_rejects_non_fsdp_strategy():
    r = subprocess.run([sys.executable, "-m", "peftplan", "trace", "--gpus", "4", "--strategy", "zero3"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("peftplan: error:") and len(r.stderr.strip().splitlines()) == 1
