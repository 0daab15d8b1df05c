"""`peftplan profile` under torchrun: two CPU processes (gloo), the simulated device, one merged result."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("torch")

from peftplan.profile.ranks import World, merge, world_from_env  # noqa: E402
from peftplan.profile.store import Failure, load  # noqa: E402


def test_torchrun_two_ranks_merge_into_one_result(tmp_path):
    from peftplan.planning import estimate
    from peftplan.plan import Plan

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = tmp_path / "measured"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "peftplan", "profile", "--dry-run", "-m", "opt-125m", "--method", "lora", "-s", "8",
                        "--steps", "1", "--warmup", "1", "--out", str(out), "--json"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    records = json.loads(r.stdout[r.stdout.index("["):r.stdout.rindex("]") + 1])  # rank 0 alone prints
    assert len(records) == 1
    files = list(out.glob("*.json"))
    assert len(files) == 1  # rank 0 alone writes
    m = load(files[0])
    assert [p.rank for p in m.ranks] == [0, 1] and all(p.status == "ok" for p in m.ranks)
    # the simulated device follows the estimate's script (phase by phase, warm-up included): each rank's own
    # peak is the estimate's peak tensor bytes within 2%, and the two ranks agree
    est = estimate("opt-125m", Plan(method="lora", seq_len=8))
    assert all(abs(p.peak_allocated_bytes / est.peak.tensor_bytes - 1) < 0.02 for p in m.ranks)
    assert m.ranks[0].peak_allocated_bytes == m.ranks[1].peak_allocated_bytes
    assert m.ranks[0].peak_allocated_bytes == m.peak_allocated_bytes


def test_merge_keeps_each_rank_and_the_worst_status():
    from peftplan.planning import estimate
    from peftplan.plan import Plan
    from peftplan.profile.fake import FakeCuda, ToyStepApi, script_from_estimate, toy_card
    from peftplan.profile.run import open_session, profile_point
    from peftplan.profile.store import Settings, measurement_from_dict

    card, fake = toy_card(), FakeCuda()
    session = open_session(fake, nvml=fake.nvml())
    plan = Plan(method="lora", seq_len=8)
    fake.expect(script_from_estimate(estimate(card, plan)))
    base = profile_point(session, card, plan, Settings(steps=1, warmup=1, nvml=False), step_api=ToyStepApi())
    assert base.status == "ok"
    oom = replace(base, status="does-not-fit", phases=(),
                  failure=Failure(kind="oom", stage="forward", step=-1, message="CUDA out of memory",
                                  allocated_bytes=1, reserved_bytes=2, peak_allocated_bytes=7, peak_reserved_bytes=9,
                                  nvml_used_bytes=None, requested_bytes=None))
    merged = merge([base, oom])
    assert merged.status == "does-not-fit" and merged.failure == oom.failure
    assert [(p.rank, p.status) for p in merged.ranks] == [(0, "ok"), (1, "does-not-fit")]
    assert merged.ranks[0].peak_allocated_bytes == base.peak_allocated_bytes
    assert merged.ranks[1].peak_reserved_bytes == 9
    assert measurement_from_dict(json.loads(json.dumps(merged.to_dict()))) == merged  # round trip


def test_world_from_env():
    assert world_from_env({}) == World(0, 1, 0)
    assert world_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == World(3, 4, 1)
