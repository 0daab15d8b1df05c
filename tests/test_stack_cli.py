"""The stack options (peft's adapter dtype and DoRA, the Trainer's autocast, accumulation, clipping, reentrant
checkpointing, flash attention, transformers <= 4.48's loss) on every command that plans a run, through the one
set of option definitions in peftplan/cli.py."""
import typing
import subprocess
import sys

import pytest

from peftplan import cli
from peftplan.profile import cli as profile_cli
from peftplan.report import cli as report_cli
from peftplan.trace import cli as trace_cli

STACK = {"adapter_dtype": cli.AdapterDtype, "dora": cli.Dora, "autocast": cli.Autocast, "grad_accum": cli.GradAccum,
         "max_grad_norm": cli.MaxGradNorm, "use_reentrant": cli.Reentrant, "logits_shift_copy": cli.ShiftCopy,
         "attention": cli.Attention}


@pytest.mark.parametrize("command", [cli.estimate, trace_cli.trace_cmd, profile_cli.profile, report_cli.report,
                                     report_cli.fit])
def test_each_command_takes_the_stack_options_from_cli_py(command):
    hints = typing.get_type_hints(command, include_extras=True)
    for name, alias in STACK.items():
        # the same typer.Option object, not a copy of it
        assert typing.get_args(hints[name])[1] is typing.get_args(alias)[1], (command.__name__, name)


def test_profile_points_carry_the_stack_options():
    points = profile_cli.points_from_options(
        "opt-125m", "lora,qlora", "16", 16.0, 0.0, None, "64", "houlsby", "2", "1", "128", "bf16", "adamw", True,
        True, "flash", True, True, {"steps": 1}, adapter_dtype="bf16", use_dora=True, autocast="bf16", grad_accum=2,
        max_grad_norm=0.0, use_reentrant=True, logits_shift_copy=True)
    assert [p.plan.method for p in points] == ["lora", "qlora"]
    for p in points:
        assert (p.plan.adapter_dtype, p.plan.use_dora, p.plan.autocast, p.plan.grad_accum, p.plan.max_grad_norm,
                p.plan.use_reentrant, p.plan.logits_shift_copy, p.plan.attention) == \
            ("bf16", True, "bf16", 2, 0.0, True, True, "flash")


def test_report_plans_dora_for_lora_methods_only(tmp_path):
    out = tmp_path / "r.html"
    r = subprocess.run([sys.executable, "-m", "peftplan", "report", "-m", "opt-125m", "--gpus", "a100-80gb",
                        "--methods", "full,lora", "--dora", "--autocast", "bf16", "--dtype", "fp32", "--grad-accum",
                        "2", "--use-reentrant", "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 0
    bad = subprocess.run([sys.executable, "-m", "peftplan", "report", "-m", "opt-125m", "--grad-accum", "0",
                          "-o", str(tmp_path / "x.html")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "gradient accumulation" in bad.stderr


def test_fit_takes_the_stack_options():
    r = subprocess.run([sys.executable, "-m", "peftplan", "fit", "-m", "opt-125m", "--gpus", "a100-80gb", "--dora",
                        "--grad-accum", "2", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_estimate_use_reentrant_is_the_plan_s():
    from peftplan.plan import Plan

    assert cli.make_plan("lora", 16, 16.0, 0.0, None, 64, "houlsby", 2, 1, 512, "bf16", "adamw", True, True, "sdpa",
                         True, True, use_reentrant=True) == Plan(grad_checkpointing=True, use_reentrant=True)
