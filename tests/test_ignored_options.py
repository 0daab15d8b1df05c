"""Options the plan's method never reads get one warning naming them; the plan is the same without them."""
from __future__ import annotations

import subprocess
import sys

import pytest

from peftplan.plan import Plan
from peftplan.planning.api import estimate

CASES = [
    (dict(method="full", r=64, targets="q_proj"), ("--r 64", "--targets q_proj")),
    (dict(method="lora", top_k=4, adapter_size=32), ("--adapter-size 32", "--top-k 4")),
    (dict(method="full", double_quant=False, kbit_prep=False), ("--no-double-quant", "--no-kbit-prep")),
    (dict(method="lora", use_reentrant=True), ("--use-reentrant",)),
]


@pytest.mark.parametrize("fields,named", CASES)
def test_ignored_options_warn_and_change_nothing(fields, named):
    est = estimate("opt-125m", **fields)
    line = [w for w in est.warnings if w.startswith("options this plan does not use")]
    assert len(line) == 1 and all(n in line[0] for n in named), est.warnings
    clean = Plan(**{k: v for k, v in fields.items() if k == "method"})
    assert estimate("opt-125m", clean).peak_bytes == est.peak_bytes


def test_options_the_plan_reads_do_not_warn():
    for fields in (dict(method="lora", r=64, targets="q_proj,v_proj"), dict(method="qlora", double_quant=False),
                   dict(method="adapter", adapter_size=32), dict(method="top", top_k=2),
                   dict(method="lora", grad_checkpointing=True, use_reentrant=True)):
        assert not [w for w in estimate("opt-125m", **fields).warnings if w.startswith("options this plan")]


def test_cli_prints_one_warning_line():
    res = subprocess.run([sys.executable, "-m", "peftplan", "estimate", "-m", "opt-125m", "--method", "full",
                          "--r", "64"], capture_output=True, text=True)
    assert res.returncode == 0
    assert [ln for ln in res.stderr.splitlines() if "does not use" in ln] == [
        "peftplan: warning: options this plan does not use (--method full): --r 64"]
