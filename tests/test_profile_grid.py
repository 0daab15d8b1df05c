"""Grids: files and list-valued options to points; running them isolated, through OOMs and interrupts."""
import json

import pytest

from peftplan.errors import PlanError
from peftplan.plan import Plan
from peftplan.profile.fake import FakeCuda, ToyStepApi, script_from_estimate, toy_card
from peftplan.profile.grid import GridPoint, dedupe, expand, load_grid, points_from_doc, run_grid, split_list
from peftplan.profile.run import isolate, open_session, profile_point
from peftplan.profile.store import Settings, load_dir, save

GRID_TOML = """
[defaults]
steps = 2
seq_len = 256

[[grid]]
model = ["opt-125m", "opt-1.3b"]
method = ["lora", "qlora"]
batch_size = [1, 4]

[[grid]]
model = "llama-3.2-1b"
method = "full"
grad_checkpointing = [false, true]
tag = "memory"
"""


def test_expand_is_the_cartesian_product_in_key_order():
    pts = expand({"model": ["a", "b"], "method": ["lora", "full"], "batch_size": 2}, {"steps": 5})
    assert [(p.model, p.plan.method) for p in pts] == [("a", "lora"), ("a", "full"), ("b", "lora"), ("b", "full")]
    assert all(p.plan.batch_size == 2 and p.settings.steps == 5 for p in pts)


def test_grid_file_toml_and_json_agree(tmp_path):
    toml = tmp_path / "g.toml"
    toml.write_text(GRID_TOML)
    pts = load_grid(toml)
    assert len(pts) == 8 + 2
    assert pts[0] == GridPoint("opt-125m", Plan(method="lora", batch_size=1, seq_len=256), Settings(steps=2))
    assert pts[-1].plan.grad_checkpointing and pts[-1].settings.tag == "memory"
    import tomllib

    js = tmp_path / "g.json"
    js.write_text(json.dumps(tomllib.loads(GRID_TOML)))
    assert load_grid(js) == pts


def test_grid_file_forms_and_errors(tmp_path):
    assert len(points_from_doc([{"model": "a", "method": ["lora", "full"]}])) == 2
    assert len(points_from_doc({"model": "a", "batch_size": [1, 2, 2]})) == 2  # one table; duplicates dropped
    with pytest.raises(PlanError, match="unknown grid key"):
        points_from_doc({"model": "a", "batchsize": 1})
    with pytest.raises(PlanError, match="needs a model"):
        points_from_doc({"method": "lora"})
    with pytest.raises(PlanError, match="unknown method"):
        points_from_doc({"model": "a", "method": "lorra"})
    with pytest.raises(PlanError, match="empty"):
        points_from_doc({"model": "a", "method": []})
    bad = tmp_path / "bad.toml"
    bad.write_text("model = [")
    with pytest.raises(PlanError, match="does not parse"):
        load_grid(bad)
    with pytest.raises(PlanError, match="cannot read"):
        load_grid(tmp_path / "missing.toml")


def test_split_list():
    assert split_list("1, 4,", int) == [1, 4]
    assert split_list("lora") == ["lora"]
    with pytest.raises(PlanError):
        split_list("1,x", int)


# ---------------------------------------------------------------- running


@pytest.fixture
def rig():
    """A simulated device, its session and a runner that OOMs where a point's batch size is 8."""
    from peftplan.planning import estimate

    card, fake = toy_card(), FakeCuda()
    session = open_session(fake, nvml=fake.nvml())
    calls = []

    def run_point(p: GridPoint):
        calls.append(p)
        oom = "optimizer" if p.plan.batch_size == 8 else None
        fake.expect(script_from_estimate(estimate(card, p.plan)), oom_stage=oom)
        return profile_point(session, card, p.plan, p.settings, step_api=ToyStepApi())

    return session, fake, run_point, calls


def points(*batches):
    return [GridPoint("toy-llama", Plan(method="lora", batch_size=b, seq_len=8), Settings(steps=1, warmup=1,
                                                                                             interval_s=0.001))
            for b in batches]


def test_oom_is_recorded_as_does_not_fit_and_the_grid_goes_on(rig, tmp_path):
    session, fake, run_point, _ = rig
    isolations = []

    def iso():
        isolations.append(fake.peak_reserved)
        isolate(fake)

    result = run_grid(points(1, 8, 2), run_point, save=lambda m: save(m, tmp_path), isolate=iso)
    assert [m.status for m in result.measurements] == ["ok", "does-not-fit", "ok"]
    dnf = result.measurements[1]
    assert dnf.failure.kind == "oom" and dnf.failure.stage == "optimizer" and dnf.failure.step == -1
    assert dnf.failure.allocated_bytes > 0 and dnf.failure.nvml_used_bytes > session.context_bytes
    assert result.counts == {"ok": 2, "does-not-fit": 1, "error": 0}
    assert not result.interrupted and result.not_run == ()
    assert len(isolations) == 4  # before each point and once after the grid
    found, skipped = load_dir(tmp_path)
    assert sorted(m.status for m in found) == ["does-not-fit", "ok", "ok"] and skipped == []


def test_interrupt_keeps_completed_results(rig, tmp_path):
    _, _, run_point, _ = rig
    pts = points(1, 2, 3, 4)

    def interrupted_at_third(p):
        if p.plan.batch_size == 3:
            raise KeyboardInterrupt
        return run_point(p)

    result = run_grid(pts, interrupted_at_third, save=lambda m: save(m, tmp_path))
    assert result.interrupted
    assert [m.plan.batch_size for m in result.measurements] == [1, 2]
    assert [p.plan.batch_size for p in result.not_run] == [3, 4]
    assert len(load_dir(tmp_path)[0]) == 2  # each was saved as it completed


def test_a_point_that_raises_is_recorded_and_the_grid_goes_on(rig):
    _, _, run_point, _ = rig

    def broken_second(p):
        if p.plan.batch_size == 2:
            raise RuntimeError("bug in a layer")
        return run_point(p)

    result = run_grid(points(1, 2, 3), broken_second)
    assert [m.plan.batch_size for m in result.measurements] == [1, 3]
    assert len(result.errors) == 1 and "bug in a layer" in result.errors[0]
    assert result.counts["error"] == 1


def test_deadline_stops_before_the_next_point(rig):
    _, _, run_point, calls = rig
    now = [0.0]

    def slow(p):
        now[0] += 10.0
        return run_point(p)

    result = run_grid(points(1, 2, 3), slow, deadline=15.0, clock=lambda: now[0])
    assert [m.plan.batch_size for m in result.measurements] == [1, 2]
    assert result.out_of_time and [p.plan.batch_size for p in result.not_run] == [3]


def test_error_in_step_is_a_result_not_an_exception(rig):
    session, fake, _, _ = rig

    class Failing(ToyStepApi):
        def make_optimizer(self, model, plan):
            raise ValueError("no such optimizer on this build")

    fake.expect({})
    m = profile_point(session, toy_card(), Plan(batch_size=1, seq_len=8), Settings(steps=1, warmup=0),
                      step_api=Failing())
    assert m.status == "error" and m.failure.kind == "error" and m.failure.stage == "ready"
    assert "no such optimizer" in m.failure.message


def test_observer_sees_every_point(rig):
    _, _, run_point, _ = rig
    seen = []

    class Obs:
        def started(self, total):
            seen.append(("started", total))

        def point_started(self, i, p):
            seen.append(("start", i))

        def point_done(self, i, p, m, error):
            seen.append(("done", i, m.status))

    run_grid(points(1, 8), run_point, observer=Obs())
    assert seen == [("started", 2), ("start", 0), ("done", 0, "ok"), ("start", 1), ("done", 1, "does-not-fit")]


def test_dedupe_keeps_order():
    a, b = points(1, 2)
    assert dedupe([a, b, a]) == [a, b]


# ---------------------------------------------------------------- on a real GPU


@pytest.mark.gpu
def test_real_gpu_grid_measures_and_survives_an_oom(tmp_path):
    """opt-125m LoRA measured on the device, then a batch no GPU holds: recorded, and the grid goes on."""
    from peftplan.profile.run import CudaBackend

    session = open_session(CudaBackend())
    pts = [GridPoint("opt-125m", Plan(method="lora", batch_size=2, seq_len=128), Settings(steps=2, warmup=1)),
           GridPoint("opt-125m", Plan(method="full", batch_size=1024, seq_len=2048), Settings(steps=1, warmup=0)),
           GridPoint("opt-125m", Plan(method="lora", batch_size=1, seq_len=128), Settings(steps=1, warmup=1))]
    result = run_grid(pts, lambda p: profile_point(session, p.model, p.plan, p.settings),
                      save=lambda m: save(m, tmp_path), isolate=lambda: isolate(session.backend))
    ok, dnf, ok2 = result.measurements
    assert ok.status == "ok" and ok2.status == "ok" and not ok.environment.simulated
    assert 0 < ok.weights_allocated_bytes < ok.peak_allocated_bytes <= ok.peak_reserved_bytes
    assert ok.nvml.context_bytes > ok.nvml.idle_bytes and ok.nvml.n_samples > 10
    assert ok.timing.tokens_per_s > 0 and ok.comparison
    assert dnf.status == "does-not-fit" and dnf.failure.kind == "oom" and dnf.failure.requested_bytes
    assert len(load_dir(tmp_path)[0]) == 3


def test_command_line_settings_are_the_grid_files_defaults(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text('[defaults]\nsteps = 7\n[[grid]]\nmodel = "a"\nmethod = ["lora", "full"]\nwarmup = 0\n')
    pts = load_grid(path, defaults={"steps": 2, "warmup": 3, "interval_s": 0.002})
    assert all((p.settings.steps, p.settings.warmup, p.settings.interval_s) == (7, 0, 0.002) for p in pts)


def test_failures_in_a_row_abort_the_grid_but_ooms_do_not(rig):
    _, _, run_point, _ = rig

    def broken(p):
        if p.plan.batch_size in (2, 3, 4):
            raise RuntimeError("CUDA error: no kernel image is available")
        return run_point(p)

    result = run_grid(points(8, 8, 1, 2, 3, 4, 5, 6), broken, max_consecutive_errors=3)
    assert [m.status for m in result.measurements] == ["does-not-fit", "does-not-fit", "ok"]
    assert result.aborted and result.stopped_early and len(result.errors) == 3
    assert [p.plan.batch_size for p in result.not_run] == [5, 6]


def test_simulated_reserved_is_the_estimates_allocator_model():
    """The CPU stand-in's max_memory_reserved is the estimate's reserved (planning/allocator.py rounding), not a
    fragmentation constant of its own: a larger allocator overhead shows up one for one (to the 2 MiB segment)."""
    from peftplan.planning import estimate

    card, fake = toy_card(), FakeCuda()
    est = estimate(card, Plan(method="full", batch_size=2, seq_len=64))
    fake.init()
    fake.expect(script_from_estimate(est))
    for stage in ("build", "forward", "backward", "optimizer", "end"):
        fake.enter(stage)
    want = max(m.reserved_bytes for m in est.phases)
    assert want - 2 * 2**20 < fake.peak_reserved <= want + 2 * 2**20
    assert fake.peak_allocated == max(m.tensor_bytes for m in est.phases)
    assert fake.peak_reserved >= fake.peak_allocated
