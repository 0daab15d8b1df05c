"""The measured-result schema: JSON round-trip, names, atomic files, versions."""
import json
import os
from dataclasses import replace

import pytest

from peftplan.errors import PlanError
from peftplan.plan import Plan
from peftplan.profile.fake import FakeCuda, ToyStepApi, script_from_estimate, toy_card
from peftplan.profile.nvml import Mark, Spike
from peftplan.profile.run import open_session, profile_point
from peftplan.profile.store import (SCHEMA_VERSION, Environment, Failure, Measurement, NvmlSummary, Settings,
                                    completed_keys, config_key, file_name, from_dict, load, load_dir,
                                    measurement_from_dict, save, to_json)

GiB = 2**30


@pytest.fixture(scope="module")
def measured():
    """A real Measurement from the profiler on the CPU stand-ins, and one that did not fit."""
    from peftplan.planning import estimate

    card, fake = toy_card(), FakeCuda()
    session = open_session(fake, nvml=fake.nvml())
    plan = Plan(method="lora", batch_size=2, seq_len=16)
    fake.expect(script_from_estimate(estimate(card, plan)))
    ok = profile_point(session, card, plan, Settings(steps=2, warmup=1, interval_s=0.001), step_api=ToyStepApi())
    fake.expect(script_from_estimate(estimate(card, plan)), oom_stage="backward")
    dnf = profile_point(session, card, plan.with_(batch_size=4), Settings(steps=1, warmup=0, interval_s=0.001),
                        step_api=ToyStepApi())
    return ok, dnf


def test_profiled_measurement_is_complete(measured):
    ok, dnf = measured
    assert ok.status == "ok" and ok.failure is None
    assert [p.phase for p in ok.phases] == ["forward", "backward", "optimizer"]
    assert ok.environment.simulated and ok.environment.gpu_name.startswith("NVIDIA H100")
    assert ok.nvml.idle_bytes < ok.nvml.context_bytes <= ok.nvml.peak_bytes
    assert ok.nvml.n_samples >= len(ok.nvml.timeline) >= 2
    assert ok.timing.tokens_per_step == 32 and ok.timing.tokens_per_s > 0 and len(ok.timing.step_times_s) == 2
    assert ok.predicted["model"] == "toy-llama" and ok.comparison
    assert dnf.status == "does-not-fit" and dnf.failure.kind == "oom" and dnf.failure.stage == "backward"
    assert dnf.failure.requested_bytes == 2 * GiB and dnf.phases == () and dnf.timing is None


def test_round_trip_through_json(measured, tmp_path):
    for m in measured:
        again = measurement_from_dict(json.loads(to_json(m)))
        assert again == m
        assert again.plan == m.plan and isinstance(again.plan, Plan)
        assert again.nvml is None or all(isinstance(x, tuple) for x in again.nvml.timeline)


def test_round_trip_of_every_nested_type():
    env = Environment("GPU", 1, None, "9.0", "d", "13.0", "2.11", "5.17", None, None, "3.12", "0.1.0")
    nv = NvmlSummary(interval_s=0.005, median_interval_s=0.0051, n_samples=3, idle_bytes=1, context_bytes=2,
                     start_bytes=3, peak_bytes=9, steady_peak_bytes=5, phase_peak_bytes={"forward": 9},
                     spikes=(Spike(0.1, 0.01, 9, 4, "forward", 0, 0.02),), timeline=((0.0, 1), (0.1, 9)),
                     marks=(Mark(0.05, "forward", 0),))
    fail = Failure("oom", "optimizer", 2, "OutOfMemoryError: ...", 1, 2, 3, 4, None, 5)
    m = Measurement(model="x", plan=Plan(method="qlora", r=8), settings=Settings(impl="peftplan", tag="t"),
                    status="does-not-fit", environment=env, nvml=nv, failure=fail, warnings=("w",))
    assert from_dict(Measurement, json.loads(to_json(m))) == m


def test_save_is_atomic_and_named_by_card_gpu_date(measured, tmp_path):
    ok, _ = measured
    path = save(ok, tmp_path / "measured")
    assert path.parent == tmp_path / "measured"
    model, gpu, date, config = path.stem.split("__")
    assert model == "toy-llama" and gpu == "h100-sxm-simulated" and date == ok.created_utc[:10]
    assert config.startswith("lora-r16-b2-s16-bf16-adamw-memory" if ok.settings.tag else "lora-r16-b2-s16")
    assert os.listdir(path.parent) == [path.name]  # no temporary left behind
    assert load(path) == ok
    save(ok, tmp_path / "measured")  # the same configuration again replaces its file
    assert len(os.listdir(path.parent)) == 1


def test_load_dir_skips_what_it_cannot_read(measured, tmp_path):
    ok, dnf = measured
    save(ok, tmp_path)
    save(dnf, tmp_path)
    (tmp_path / "junk.json").write_text("{not json")
    newer = ok.to_dict() | {"schema_version": SCHEMA_VERSION + 1}
    (tmp_path / "newer.json").write_text(json.dumps(newer))
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    found, skipped = load_dir(tmp_path)
    assert sorted(m.status for m in found) == ["does-not-fit", "ok"]
    assert len(skipped) == 3 and any("newer" in s for s in skipped)


def test_unknown_fields_of_a_newer_writer_are_ignored(measured):
    ok, _ = measured
    d = json.loads(to_json(ok))
    d["new_top_level"] = 1
    d["settings"]["new_setting"] = True
    assert measurement_from_dict(d) == ok


def test_config_key_is_stable_and_distinguishes_what_matters():
    plan = Plan(method="lora", batch_size=4)
    base = config_key("opt-125m", plan, Settings())
    assert base == config_key("opt-125m", plan, Settings(steps=10, warmup=3))  # step counts do not matter
    others = {config_key("opt-125m", plan.with_(grad_checkpointing=True), Settings()),
              config_key("opt-350m", plan, Settings()), config_key("opt-125m", plan, Settings(impl="peft")),
              config_key("opt-125m", plan, Settings(nvml=False)), config_key("opt-125m", plan, Settings(tag="x")),
              config_key("opt-125m", plan.with_(r=8), Settings())}
    assert base not in others and len(others) == 6


def test_completed_keys_only_counts_real_runs_on_that_gpu(measured):
    ok, _ = measured
    assert completed_keys([ok]) == set()  # simulated results are not measurements
    real = replace(ok, environment=replace(ok.environment, simulated=False, gpu_card="h100-sxm-80gb"))
    assert completed_keys([real], "h100-sxm-80gb") == {ok.key}
    assert completed_keys([real], "a100-40gb") == set()


def test_settings_and_status_are_checked():
    with pytest.raises(PlanError, match="steps"):
        Settings(steps=0)
    with pytest.raises(PlanError, match="implementation"):
        Settings(impl="unsloth")
    with pytest.raises(PlanError, match="status"):
        Measurement(model="x", plan=Plan(), settings=Settings(), status="maybe",
                    environment=Environment("", 0, None, "", "", "", "", "", None, None, "", ""))


def test_file_name_without_a_date_or_card(measured):
    ok, _ = measured
    m = replace(ok, created_utc="", environment=replace(ok.environment, gpu_card="h100-sxm", simulated=False))
    assert file_name(m).startswith("toy-llama__h100-sxm__0000-00-00__")


@pytest.mark.parametrize("device, gib, card", [
    ("NVIDIA H100 80GB HBM3", 79.1, "h100-sxm"), ("NVIDIA H100 PCIe", 79.1, "h100-pcie"),
    ("NVIDIA H200", 139.8, "h200"), ("NVIDIA A100-SXM4-40GB", 39.4, "a100-40gb"),
    ("NVIDIA A100 80GB PCIe", 79.1, "a100-80gb"), ("NVIDIA GeForce RTX 4090", 23.6, "rtx4090"),
    ("Tesla T4", 14.6, "t4"), ("NVIDIA L40S", 44.4, "l40s"),
    ("NVIDIA H100 NVL", 93.0, None),  # no card of that memory: better none than a wrong one
    ("Some Future Accelerator", 64.0, None),
])
def test_environment_matches_the_local_gpu_to_a_card(device, gib, card):
    from peftplan.planning.gpus import gpu_registry
    from peftplan.profile.run import match_gpu_card

    if card is not None and card not in gpu_registry():
        pytest.skip(f"no GPU card '{card}' shipped")
    assert match_gpu_card(device, int(gib * GiB)) == card


def test_recorded_card_reproduces_the_prediction(measured):
    """What issue 7's CPU test does for every committed result: the estimate again, from the record alone."""
    from peftplan.planning import estimate

    ok, _ = measured
    card = ok.model_card()
    assert card == toy_card()
    again = estimate(card, ok.plan, gpu=ok.environment.gpu_card).to_dict()
    assert json.loads(json.dumps(again)) == ok.predicted
