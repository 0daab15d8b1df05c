"""fp16 autocast's GradScaler (the Trainer's fp16=True), in the trace's step and in the estimate."""
import dataclasses

import pytest

from peftplan.cli import run_app
from peftplan.errors import PlanError
from peftplan.plan import Plan
from peftplan.planning import estimate
from peftplan.planning.cards import registry
from peftplan.planning.scaler import scaler_bytes


def small(name: str, layers: int = 1):
    return dataclasses.replace(registry()[name], n_layers=layers, name=f"{name}-{layers}L")


@pytest.mark.parametrize("plan", [
    Plan(method="lora", dtype="fp32", autocast="fp16", batch_size=1, seq_len=16),
    Plan(method="full", dtype="fp32", autocast="fp16", batch_size=1, seq_len=16, grad_accum=2),
])
def test_scaler_tensors_in_trace_equal_the_estimate_s(plan):
    pytest.importorskip("torch")
    from peftplan.trace.run import trace

    card = small("opt-125m")
    bf16 = plan.with_(autocast="bf16")  # the same step without a scaler (bf16 needs none)
    traced = {p.phase: p.peak_bytes for p in trace(card, plan).phases}
    traced_bf16 = {p.phase: p.peak_bytes for p in trace(card, bf16).phases}
    est, est_bf16 = ({m.phase: m.tensor_bytes for m in estimate(card, p).phases} for p in (plan, bf16))
    for phase in ("forward", "backward", "optimizer"):
        assert traced[phase] - traced_bf16[phase] == scaler_bytes(plan, phase) > 0, phase
        assert est[phase] - est_bf16[phase] == scaler_bytes(plan, phase), phase


def test_the_step_runs_the_trainer_s_scaler_order():
    torch = pytest.importorskip("torch")
    from peftplan.measure.scaler import StepScaler, scaler_for
    from peftplan.measure.step import build_model, make_batch, make_optimizer, train_step

    card, plan = small("opt-125m"), Plan(method="lora", dtype="fp32", autocast="fp16", batch_size=1, seq_len=8)
    model, _ = build_model(card, plan, "cpu")
    opt = make_optimizer(model, plan)
    batch = make_batch(card, plan, "cpu")
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    for _ in range(2):
        train_step(model, batch, opt, plan)
    scaler = scaler_for(opt, plan, torch.device("cpu"))
    assert isinstance(scaler, StepScaler)
    assert float(scaler.get_scale()) == 65536.0 and int(scaler._growth_tracker) == 2  # two finite steps taken
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    assert scaler_for(opt, plan.with_(autocast="bf16"), torch.device("cpu")) is None


def test_fp16_gradients_are_refused_as_gradscaler_refuses_them(capsys):
    with pytest.raises(PlanError, match="GradScaler"):
        Plan(method="full", dtype="fp16", autocast="fp16")
    with pytest.raises(PlanError, match="GradScaler"):
        Plan(method="lora", dtype="fp16", adapter_dtype="fp16", autocast="fp16")
    Plan(method="lora", dtype="fp16", autocast="fp16")  # fp32 adapters: fp32 gradients
    assert run_app(["estimate", "--method", "full", "--dtype", "fp16", "--autocast", "fp16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("peftplan: error:") and "GradScaler" in err
