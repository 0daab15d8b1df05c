"""benchmarks/gpu_validate.py end to end on the CPU (--dry-run: tiny cards, simulated CUDA and NVML)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peftplan.planning.cards import registry
from peftplan.profile.store import load_dir

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_validate.py"
SHELL = REPO / "benchmarks" / "gpu_validate.sh"
POINTS = ("^(opt-125m (full|qlora) b4 s512 memory|llama-3.1-8b full b4 s512 memory"
          "|opt-1.3b lora b4 s512 nvml-overhead-1( no-nvml)?)$")


@pytest.fixture(scope="module")
def gv():
    spec = importlib.util.spec_from_file_location("gpu_validate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def need_cards(*names):
    missing = [n for n in names if n not in registry()]
    if missing:
        pytest.skip(f"model cards not shipped yet: {', '.join(missing)}")


def test_grid_is_ordered_by_value_and_covers_the_issues(gv):
    known = {"opt-125m", "opt-350m", "opt-1.3b", "opt-2.7b", "opt-6.7b", "llama-3.2-1b", "llama-3.1-8b"}
    points, missing = gv.validation_points(known)
    assert missing == []
    labels = [p.label for p in points]
    assert labels[0] == "opt-125m full b4 s512 memory"  # the smallest card first: a broken pipeline shows early
    assert len(labels) == len(set(labels)) >= 60
    methods = {(p.model, p.plan.method) for p in points}
    for model in ("llama-3.2-1b", "opt-1.3b"):
        assert {m for mod, m in methods if mod == model} == {"full", "top", "adapter", "lora", "qlora"}
    assert {(p.plan.batch_size, p.plan.seq_len) for p in points} == {(4, 512), (1, 2048)}
    assert any(p.plan.grad_checkpointing for p in points) and any(not p.plan.grad_checkpointing for p in points)
    assert any(p.plan.optimizer == "paged-adamw8bit" and p.plan.method == "qlora" for p in points)
    assert {p.settings.impl for p in points} == {"peftplan", "peft"}
    assert any(not p.settings.nvml for p in points if p.settings.tag.startswith("nvml-overhead"))
    # memory points for issue 7 come before throughput, overhead and the rest
    first_other = next(i for i, p in enumerate(points) if p.settings.tag != "memory")
    assert first_other >= 40
    # a registry spelling the 8B differently still gets a Llama card
    alt, missing = gv.validation_points({"opt-125m", "llama-2-7b"})
    assert any(p.model == "llama-2-7b" for p in alt) and "llama-3.1-8b" not in missing


def test_dry_run_end_to_end(gv, tmp_path, capsys):
    need_cards("opt-125m", "opt-1.3b", "llama-3.1-8b")
    out = tmp_path / "out"
    rc = gv.main(["--out", str(out), "--dry-run", "--only", POINTS, "--fake-memory-gib", "40"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "[5/5" in printed and "does-not-fit" in printed
    run = json.loads((out / "run.json").read_text())
    assert run["dry_run"] and run["finished"] and run["environment"]["simulated"]
    assert run["counts"] == {"ok": 4, "does-not-fit": 1, "error": 0}
    assert {s["metric"] for s in run["summaries"]} >= {"peak.reserved", "tokens_per_s"}
    assert "nvml_overhead" in run["ratios"]
    found, skipped = load_dir(out / "measured")
    assert len(found) == 5 and skipped == []
    dnf = next(m for m in found if m.status == "does-not-fit")
    assert dnf.model == "llama-3.1-8b-tiny" and dnf.failure.kind == "oom"
    assert all(m.environment.simulated for m in found)
    assert len((out / "progress.log").read_text().splitlines()) == 6  # a header and a line per point


def test_budget_stops_cleanly(gv, tmp_path):
    need_cards("opt-125m")
    out = tmp_path / "out"
    rc = gv.main(["--out", str(out), "--dry-run", "--only", "^opt-125m", "--budget-s", "1"])
    run = json.loads((out / "run.json").read_text())
    assert rc == 1 and run["out_of_time"] and not run["finished"] and run["not_run"]
    assert load_dir(out / "measured")[0] == []


def test_skip_existing_ignores_simulated_results(gv, tmp_path, capsys):
    need_cards("opt-125m")
    out = tmp_path / "out"
    args = ["--out", str(out), "--dry-run", "--only", "^opt-125m full b4 s512 memory$"]
    assert gv.main(args) == 0
    assert gv.main(args + ["--skip-existing", str(out / "measured")]) == 0  # simulated: measured again
    assert "0 point(s) already measured" in capsys.readouterr().err
    (path,) = (out / "measured").glob("*.json")
    doc = json.loads(path.read_text())
    # as if the real point had been measured on that GPU (a dry run measures a toy card at toy shapes)
    doc["environment"]["simulated"] = False
    doc["model"] = "opt-125m"
    doc["plan"] |= {"batch_size": 4, "seq_len": 512}
    path.write_text(json.dumps(doc))
    assert gv.main(args + ["--skip-existing", str(out / "measured")]) == 0
    assert "1 point(s) already measured" in capsys.readouterr().err


def test_shell_wrapper_dry_run_without_plotly(tmp_path):
    """The .sh as the GPU machine runs it, with plotly made unimportable (that machine has none)."""
    need_cards("opt-125m")
    block = tmp_path / "site"
    block.mkdir()
    (block / "sitecustomize.py").write_text("import sys\nsys.modules['plotly'] = None\n")
    env = dict(os.environ, PYTHONPATH=f"{block}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               PYTHON=sys.executable)
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SHELL), str(out), "--budget-s", "200", "--dry-run", "--only",
                           "^opt-125m lora b4 s512 memory$"], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[1/1" in proc.stdout and "exit 0" in proc.stderr
    assert len(load_dir(out / "measured")[0]) == 1
