"""Measurement beside the estimate: the signed-error maths on hand-made numbers."""
import pytest

from peftplan.plan import Plan
from peftplan.profile.compare import (grid_summary, memory_rows, predicted_phases, rel_error, row, summarise,
                                      throughput_row, trace_rows)
from peftplan.profile.nvml import Mark
from peftplan.profile.store import Environment, Measurement, NvmlSummary, PhaseMeasure, Settings, Timing

MiB = 2**20
ENV = Environment("GPU", 80 << 30, "h100", "9.0", "", "", "", "", None, None, "", "")


def phase_dict(phase, frozen, opt, act, ctx=500 * MiB, frag=10 * MiB):
    return {"phase": phase, "frozen_weights_bytes": frozen, "trainable_weights_bytes": 0, "gradients_bytes": 0,
            "optimizer_states_bytes": opt, "activations_bytes": act, "logits_bytes": 0, "temporaries_bytes": 0,
            "cuda_context_bytes": ctx, "allocator_overhead_bytes": frag}


PREDICTED = {
    "model": "m", "phases": [phase_dict("forward", 1000 * MiB, 100 * MiB, 400 * MiB),
                             phase_dict("backward", 1000 * MiB, 100 * MiB, 500 * MiB),
                             phase_dict("optimizer", 1000 * MiB, 100 * MiB, 0)],
    "time": {"tokens_per_s": 11_000.0, "utilisation": 0.35},
}


def measurement(**kw):
    phases = (PhaseMeasure("forward", 1500 * MiB, 1600 * MiB, 1100 * MiB, 0.1, 2200 * MiB),
              PhaseMeasure("backward", 1500 * MiB, 1650 * MiB, 1100 * MiB, 0.2, 2250 * MiB),
              PhaseMeasure("optimizer", 1200 * MiB, 1650 * MiB, 1100 * MiB, 0.05, 2250 * MiB))
    nvml = NvmlSummary(interval_s=0.005, median_interval_s=0.005, n_samples=10, idle_bytes=100 * MiB,
                       context_bytes=600 * MiB, start_bytes=600 * MiB, peak_bytes=2250 * MiB,
                       steady_peak_bytes=2250 * MiB, phase_peak_bytes={}, spikes=(), timeline=(),
                       marks=(Mark(0.0, "forward", 0),))
    timing = Timing((0.2, 0.2), 0.2, 2048, 10_240.0, 1e12, 5.0, 989.0, 5.0 / 989.0)
    base = dict(model="m", plan=Plan(), settings=Settings(), status="ok", environment=ENV,
                weights_allocated_bytes=1000 * MiB, step_start_allocated_bytes=1100 * MiB, phases=phases,
                timing=timing, nvml=nvml, predicted=PREDICTED)
    return Measurement(**(base | kw))


def by_name(rows):
    return {r.name: r for r in rows}


def test_rel_error_is_signed_against_the_measurement():
    assert rel_error(110, 100) == pytest.approx(0.10)  # predicts too much
    assert rel_error(90, 100) == pytest.approx(-0.10)
    assert rel_error(5, 0) is None
    r = row("x", 200, 150)
    assert (r.error_bytes, r.rel_error, r.reference) == (-50, -0.25, "estimate")


def test_predicted_phases_rebuild_tensor_reserved_device():
    p = predicted_phases(PREDICTED)["backward"]
    assert p["tensor"] == 1600 * MiB
    assert p["reserved"] == 1610 * MiB
    assert p["device"] == 2110 * MiB


def test_memory_rows_per_phase_and_component():
    rows = by_name(memory_rows(measurement()))
    assert rows["forward.peak_allocated"].predicted_bytes == 1500 * MiB
    assert rows["forward.peak_allocated"].rel_error == 0.0
    assert rows["backward.peak_allocated"].rel_error == pytest.approx(100 / 1500)
    assert rows["backward.peak_reserved"].error_bytes == (1610 - 1650) * MiB
    # NVML figures are measured from the idle baseline: what this process put on the device
    assert rows["backward.device"].measured_bytes == 2150 * MiB
    assert rows["backward.device"].predicted_bytes == 2110 * MiB
    assert rows["peak.reserved"].measured_bytes == 1650 * MiB and rows["peak.reserved"].predicted_bytes == 1610 * MiB
    assert rows["peak.allocated"].predicted_bytes == 1600 * MiB
    assert rows["peak.device"].measured_bytes == 2150 * MiB
    assert rows["weights"].rel_error == 0.0
    assert rows["optimizer_states"].measured_bytes == 100 * MiB and rows["optimizer_states"].rel_error == 0.0
    assert rows["allocator_overhead"].measured_bytes == 150 * MiB  # reserved − allocated at the reserved peak
    assert rows["cuda_context"].measured_bytes == 500 * MiB and rows["cuda_context"].rel_error == 0.0
    assert rows["non_torch"].measured_bytes == (2150 - 1650) * MiB and rows["non_torch"].rel_error == 0.0


def test_no_rows_without_a_result_or_a_prediction():
    assert memory_rows(measurement(status="does-not-fit", phases=(), timing=None)) == ()
    assert memory_rows(measurement(predicted=None)) == ()
    rows = by_name(memory_rows(measurement(nvml=None)))
    assert "peak.device" not in rows and "cuda_context" not in rows and "non_torch" not in rows
    assert "peak.reserved" in rows


def test_trace_rows():
    rows = by_name(trace_rows(measurement(), {"forward": 1450 * MiB, "backward": 1500 * MiB}))
    assert rows["trace.forward.peak_allocated"].reference == "trace"
    assert rows["trace.forward.peak_allocated"].error_bytes == -50 * MiB
    assert rows["trace.peak.allocated"].rel_error == 0.0
    assert "trace.optimizer.peak_allocated" not in rows


def test_throughput_row():
    t = throughput_row(measurement())
    assert t.rel_error == pytest.approx(11_000 / 10_240 - 1)
    assert t.predicted_utilisation == 0.35 and t.measured_utilisation == pytest.approx(5 / 989)
    assert throughput_row(measurement(predicted={"phases": []})) is None


def test_summaries_over_a_grid():
    s = summarise("m", [("a", 0.01), ("b", -0.04), ("c", 0.02)])
    assert (s.n, s.median_abs_error, s.max_abs_error, s.worst, s.bias) == (3, 0.02, 0.04, "b", 0.01)
    assert s.within(0.03, 0.06) and not s.within(0.01, 0.06)
    assert summarise("m", []).n == 0 and not summarise("m", []).within(1, 1)
    ms = [measurement(), measurement(plan=Plan(batch_size=2)), measurement(status="does-not-fit")]
    ms = [m.__class__(**{**m.__dict__, "comparison": memory_rows(m), "throughput": throughput_row(m)}) for m in ms]
    summaries = {s.metric: s for s in grid_summary(ms)}
    assert summaries["peak.reserved"].n == 2
    assert summaries["peak.reserved"].median_abs_error == pytest.approx(40 / 1650)
    assert summaries["tokens_per_s"].n == 2
