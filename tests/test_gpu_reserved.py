"""benchmarks/gpu_reserved.py (the GPU check of the allocator replay) end to end on the CPU with --dry-run."""
import importlib.util
import json
from pathlib import Path

from peftplan.plan import Plan

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_reserved.py"


def test_dry_run_writes_the_comparison(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_reserved", SCRIPT)
    gr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gr)
    monkeypatch.setattr(gr, "POINTS", [("opt-125m", Plan(method="lora", batch_size=1, seq_len=32), (32,),
                                        "expandable_segments:True")])
    assert gr.main(["--out", str(tmp_path), "--dry-run"]) == 0
    doc = json.loads((tmp_path / "reserved.json").read_text())
    (row,) = doc["rows"]
    assert doc["dry_run"] and not doc["errors"]
    # the trace's stream, passed through the snapshot format, replays to the same reserved and segments
    assert row["rules_error"] == 0 and row["segments_mismatched"] == 0
    assert row["replay_of_trace_reserved_bytes"] >= row["trace_live_bytes"] > 0
    assert row["gpu_events"] > 100


def test_device_trace_conversion():
    import importlib.util as u

    spec = u.spec_from_file_location("gpu_reserved", SCRIPT)
    gr = u.module_from_spec(spec)
    spec.loader.exec_module(gr)
    trace = [{"action": "segment_alloc", "addr": 0, "size": 2 << 20}, {"action": "alloc", "addr": 0, "size": 100},
             {"action": "free_requested", "addr": 0, "size": 100}, {"action": "free_completed", "addr": 0, "size": 100}]
    assert gr.events_from_device_trace(trace) == [("a", 0, 100, 0, "gpu", "", "", 0), ("f", 0, 0, 0, "gpu", "", "", 0)]
