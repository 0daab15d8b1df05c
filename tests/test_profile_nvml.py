"""The NVML sampler against a stand-in NVML, and the timeline analysis on synthetic series."""
import time

import pytest

from peftplan.profile.fake import FakeNvml
from peftplan.profile.nvml import (GpuUnavailable, Mark, NvmlSampler, change_points, detect_spikes, load_nvml,
                                   mark_at, peak_by_phase, steady_peak_bytes)

MiB = 2**20
GiB = 2**30


class Level:
    """A device whose memory in use the test sets."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __call__(self) -> int:
        return self.value


def wait_for(cond, timeout=2.0):
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.001)
    assert cond()


def test_sampler_records_timeline_baseline_and_marks():
    level = Level(500 * MiB)
    nvml = FakeNvml(used=level)
    sampler = NvmlSampler(nvml, nvml.nvmlDeviceGetHandleByIndex(0), interval_s=0.001).start()
    wait_for(lambda: len(sampler._samples) >= 5)
    level.value = 3 * GiB
    sampler.mark("forward", 0)
    wait_for(lambda: sampler.last_bytes == 3 * GiB)
    sampler.mark("backward", 0)
    level.value = 2 * GiB
    wait_for(lambda: sampler.last_bytes == 2 * GiB)
    tl = sampler.stop()

    assert tl.baseline_bytes == 500 * MiB  # read when the sampler started, before the "model"
    assert tl.samples[0] == (0.0, 500 * MiB)
    times = [t for t, _ in tl.samples]
    assert times == sorted(times) and len(times) >= 7
    assert {v for _, v in tl.samples} == {500 * MiB, 3 * GiB, 2 * GiB}
    assert [(m.label, m.step) for m in tl.marks] == [("forward", 0), ("backward", 0)]
    assert tl.marks[0].t_s < tl.marks[1].t_s <= tl.samples[-1][0]
    assert tl.error == ""
    assert nvml.calls == len(tl.samples)  # one NVML query per sample, nothing else
    assert peak_by_phase(tl.samples, tl.marks) == {"forward": 3 * GiB, "backward": 3 * GiB}


def test_sampler_keeps_samples_when_nvml_fails():
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] > 4:
            raise RuntimeError("GPU is lost")
        return 1 * GiB

    sampler = NvmlSampler(FakeNvml(used=flaky), None, interval_s=0.001).start()
    wait_for(lambda: not sampler._thread.is_alive())  # the thread ends at the failing read
    tl = sampler.stop()
    assert "GPU is lost" in tl.error
    assert 1 <= len(tl.samples) <= 4 and all(v == 1 * GiB for _, v in tl.samples)


def test_interval_must_be_positive():
    with pytest.raises(Exception, match="positive"):
        NvmlSampler(FakeNvml(), None, interval_s=0)


def test_load_nvml_names_the_missing_library():
    with pytest.raises(GpuUnavailable, match="NVML library not found"):
        load_nvml(FakeNvml(missing=True))


def test_real_pynvml_without_a_driver_is_one_clear_error():
    pynvml = pytest.importorskip("pynvml")
    try:
        load_nvml(pynvml)
    except GpuUnavailable as e:
        assert "NVML library not found" in str(e) and "\n" not in str(e)
    else:
        pytest.skip("this machine has an NVIDIA driver")


# ---------------------------------------------------------------- analysis on synthetic series

def series(*segments, dt=0.005, t0=0.0):
    """[(t, v)] from (duration_s, value) segments sampled every dt."""
    out, t = [], t0
    for duration, value in segments:
        for _ in range(round(duration / dt)):
            out.append((round(t, 6), value))
            t += dt
    return out


def test_steady_peak_ignores_short_excursions():
    s = series((0.2, 1 * GiB), (0.010, 9 * GiB), (0.3, 5 * GiB), (0.02, 7 * GiB), (0.2, 5 * GiB))
    assert steady_peak_bytes(s, 0.05) == 5 * GiB
    assert steady_peak_bytes(s, 0.005) == 9 * GiB  # a window of one sample: every level is steady
    assert steady_peak_bytes(s[:3], 0.05) == 1 * GiB  # shorter than one window: its minimum
    assert steady_peak_bytes([], 0.05) == 0


def test_steady_peak_on_change_points_equals_raw():
    s = series((0.2, 1 * GiB), (0.03, 6 * GiB), (0.3, 4 * GiB), (0.01, 8 * GiB), (0.1, 4 * GiB))
    assert steady_peak_bytes(change_points(s), 0.05) == steady_peak_bytes(s, 0.05) == 4 * GiB


def test_spikes_found_with_their_phase_and_offset():
    s = series((0.1, 1 * GiB), (0.2, 5 * GiB), (0.015, 6 * GiB), (0.2, 5 * GiB), (0.01, 5 * GiB + 4 * MiB),
               (0.1, 5 * GiB))
    marks = [Mark(0.0, "build"), Mark(0.1, "forward", 0), Mark(0.25, "backward", 0), Mark(0.4, "optimizer", 0)]
    spikes = detect_spikes(s, marks, min_steady_s=0.05)
    assert len(spikes) == 1  # +4 MiB is below the 16 MiB threshold
    sp = spikes[0]
    assert sp.peak_bytes == 6 * GiB and sp.excess_bytes == 1 * GiB
    assert sp.t_s == pytest.approx(0.3) and sp.duration_s == pytest.approx(0.015)
    assert (sp.phase, sp.step) == ("backward", 0)
    assert sp.phase_offset_s == pytest.approx(0.05)


def test_spike_thresholds_and_trailing_run():
    s = series((0.2, 10 * GiB), (0.01, 10 * GiB + 40 * MiB), (0.2, 10 * GiB), (0.01, 12 * GiB))
    # 40 MiB is above 16 MiB but below 0.5% of 10 GiB (51 MiB): noise
    spikes = detect_spikes(s, min_steady_s=0.05)
    assert [sp.peak_bytes for sp in spikes] == [12 * GiB]  # the run at the very end closes too
    assert spikes[0].phase == "" and spikes[0].step == -1
    assert len(detect_spikes(s, min_steady_s=0.05, min_excess_fraction=0.0)) == 2


def test_flat_timeline_has_no_spikes():
    assert detect_spikes(series((0.5, 3 * GiB))) == ()


def test_change_points_keep_the_step_function():
    s = [(0.0, 1), (0.1, 1), (0.2, 2), (0.3, 2), (0.4, 2), (0.5, 1)]
    assert change_points(s) == ((0.0, 1), (0.2, 2), (0.5, 1))
    assert change_points([(0.0, 1), (0.1, 1)]) == ((0.0, 1), (0.1, 1))  # the end time is kept
    assert change_points([]) == ()


def test_mark_at_and_peak_by_phase():
    marks = [Mark(0.0, "build"), Mark(1.0, "forward", 0), Mark(2.0, "backward", 0), Mark(3.0, "forward", 1)]
    assert mark_at(marks, 0.5).label == "build" and mark_at(marks, 2.0).label == "backward"
    assert mark_at(marks, -1) is None
    samples = [(0.0, 1), (0.5, 9), (1.1, 4), (1.5, 6), (2.5, 5), (3.2, 7)]
    # each span counts the level in force at its mark: forward 0 opens while 9 is held, backward while 6 is
    assert peak_by_phase(samples, marks) == {"forward": 9, "backward": 6}
    assert peak_by_phase(samples[2:], marks)["forward"] == 7
    assert peak_by_phase(samples, marks, steps_only=False)["build"] == 9
