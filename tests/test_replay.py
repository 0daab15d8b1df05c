"""The allocator replay of traced steps: consistent with the trace, reserved ≥ allocated, growth across lengths."""
from __future__ import annotations

import json
from pathlib import Path
import sys

import pytest

from peftplan.errors import PlanError
from peftplan.plan import Plan
from peftplan.planning.allocator import AllocatorConfig, CachingAllocator, round_size
from peftplan.planning.cards import load_card
from peftplan.planning.replay import lengths_from_percentiles, replay
from peftplan.results import PHASES

LENS = (64, 128, 64, 96)


@pytest.fixture(scope="module")
def traced():
    from peftplan.trace.run import trace

    return trace(load_card("opt-125m"), Plan(method="lora", batch_size=1, seq_len=64), seq_lens=LENS,
                 record_events=True)


def test_replay_matches_the_trace(traced):
    rp = replay(traced.events)
    allocs = [e for e in traced.events if e[0] == "a"]
    assert rp.allocations == len(allocs) > 1000
    assert rp.frees <= rp.allocations
    last = len(LENS) - 1
    for p in traced.phases:  # the trace reports the last step; its per-phase live peaks come from its own sums
        assert rp.phase_peak(p.phase, step=last).peak_live_bytes == p.peak_bytes
    assert {p.phase for p in traced.phases} == set(PHASES)
    assert rp.peak_allocated_bytes >= rp.peak_live_bytes
    assert rp.peak_reserved_bytes >= rp.peak_allocated_bytes


@pytest.mark.parametrize("config", [AllocatorConfig(), AllocatorConfig(expandable_segments=True),
                                    AllocatorConfig(max_split_size_mb=32)], ids=["default", "expandable", "split32"])
def test_reserved_never_below_allocated(traced, config):
    a, addr, live = CachingAllocator(config), {}, 0
    for i, (action, key, nbytes, stream, *_) in enumerate(traced.events):
        if action == "a" and nbytes:
            addr[key] = (a.malloc(nbytes, stream), round_size(nbytes))
            live += round_size(nbytes)
        elif action == "f" and key in addr:
            at, n = addr.pop(key)
            a.free(at)
            live -= n
        s = a.stats
        assert s.reserved_bytes >= s.allocated_bytes >= live >= 0
        if i % 500 == 0:  # the segments' sizes add up to reserved (mapped ranges, for expandable segments)
            assert sum(seg.total_size for seg in a.snapshot()) == s.reserved_bytes


def test_reserved_grows_with_new_longer_lengths_only(traced):
    rp = replay(traced.events, seq_lens=LENS)
    r = rp.reserved_per_step
    assert list(r) == sorted(r)  # reserved never shrinks: empty_cache is never called mid-run
    assert r[1] > r[0]  # 128 after 64: larger activations than any cached block -> new segments
    # lengths already seen (64, 128) or shorter (96 < 128) reuse the cache: no growth
    assert r[2] == r[1] and r[3] == r[1]


def test_expandable_segments_reserve_less_here(traced):
    assert replay(traced.events, AllocatorConfig(expandable_segments=True)).peak_reserved_bytes \
        < replay(traced.events).peak_reserved_bytes


def test_memory_limit_below_the_peak_reports_oom(traced):
    rp = replay(traced.events, AllocatorConfig(memory_limit_bytes=200 * 2**20))
    assert rp.oom and "reserved but unallocated" in rp.oom


def test_lengths_from_percentiles():
    lens = lengths_from_percentiles({50: 512, 90: 1800, 100: 2048}, steps=400, seed=1)
    assert len(lens) == 400 and min(lens) >= 512 and max(lens) <= 2048
    s = sorted(lens)
    assert 512 <= s[200] <= 700 and 1500 <= s[360] <= 1900  # near the 50th and 90th percentiles
    assert lens == lengths_from_percentiles({50: 512, 90: 1800, 100: 2048}, steps=400, seed=1)
    for bad in ({}, {50: 600, 90: 500}, {120: 512}):
        with pytest.raises(PlanError):
            lengths_from_percentiles(bad, steps=4)


def test_malformed_events_raise():
    with pytest.raises(PlanError):
        replay([("a", 1, 10)])
    with pytest.raises(PlanError):
        replay([])


def make_app():
    import typer

    from peftplan.trace import cli as trace_cli

    app = typer.Typer(pretty_exceptions_enable=False)

    @app.callback()
    def main() -> None:
        """peftplan (test app)"""

    trace_cli.register(app)
    return app


def test_cli_trace_reserved_json_and_errors(traced):  # after the fixture: transformers is loaded
    from typer.testing import CliRunner

    res = CliRunner().invoke(make_app(), ["trace", "-m", "opt-125m", "--method", "lora", "-s", "32", "--seq-lens",
                                          "32,64", "--alloc-conf", "expandable_segments:True", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["replay"]["config"]["expandable_segments"] is True
    assert d["replay"]["peak_reserved_bytes"] >= d["replay"]["peak_allocated_bytes"] >= d["peak_bytes"]
    assert len(d["replay"]["reserved_per_step"]) == 2 and "events" not in d
    for args in (["--alloc-conf", "max_split_size_mb:5"], ["--seq-lens", "64,x"]):
        bad = CliRunner().invoke(make_app(), ["trace", "-m", "opt-125m", *args])
        assert bad.exit_code == 2 and "peftplan: error:" in bad.output and "Traceback" not in bad.output


def test_parse_seq_lens():
    from peftplan.trace.reserved import parse_seq_lens

    assert parse_seq_lens("512, 2048,1024", None, 2) == (512, 2048, 1024)
    assert parse_seq_lens(None, None, 2) is None
    assert len(parse_seq_lens(None, "50:512,100:2048", 7)) == 7
    for args in (("64,x", None), ("0,64", None), (None, "50:64,90:32"), (None, "50-64"), ("64", "50:64")):
        with pytest.raises(PlanError):
            parse_seq_lens(*args, 4)


FIT = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "reserved_fit.jsonl"


def test_estimate_uses_the_relation_fitted_from_replays():
    import statistics

    from peftplan.planning import estimate
    from peftplan.planning.memory import RESERVED_PER_LIVE

    rows = [json.loads(x) for x in FIT.read_text().splitlines()]
    assert len(rows) >= 40
    for phase in ("backward", "optimizer"):
        ratios = [r["default"]["peak_reserved_bytes"] / r["default"]["peak_live_bytes"] for r in rows
                  if r["peak_phase"] == phase]
        assert abs(RESERVED_PER_LIVE[phase] - statistics.median(ratios)) < 0.002
    assert RESERVED_PER_LIVE["forward"] == RESERVED_PER_LIVE["backward"]
    for m in estimate("opt-6.7b", method="lora").phases:
        assert m.allocator_overhead_bytes == int((RESERVED_PER_LIVE[m.phase] - 1) * m.tensor_bytes)
        assert m.reserved_bytes > m.tensor_bytes


@pytest.mark.skipif(not any(p.exists() for p in (
    Path(__file__).resolve().parents[2] / "shared" / "published" / "measurements.jsonl",
    Path("/work/shared/published/measurements.jsonl"))), reason="no published data")
def test_published_reserved_rows_improve_on_the_flat_2pct():
    import importlib.util

    spec = importlib.util.spec_from_file_location("published_reserved", FIT.parent.parent / "published_reserved.py")
    pr = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pr  # its dataclasses look their module up
    spec.loader.exec_module(pr)
    rows = pr.reserved_rows()
    assert len(rows) >= 5 and all(r.smi_mib > r.allocated_mib for r in rows)
    s = pr.evaluate_reserved(rows)["summary"]
    assert s["fitted"]["mean_abs_error"] < s["flat"]["mean_abs_error"]
    assert s["replayed"]["n"] >= 3
    assert s["replayed"]["mean_abs_error"] < s["flat_on_replayed_rows"]["mean_abs_error"]
