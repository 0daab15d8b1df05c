"""`peftplan profile` through typer's CliRunner, on an app where `register` added it."""
import json
from types import SimpleNamespace

import pytest
import typer
from typer.testing import CliRunner

from peftplan.profile import cli as profile_cli
from peftplan.profile.fake import FakeCuda, FakeNvml, ToyStepApi, script_from_estimate, toy_card
from peftplan.profile.nvml import GpuUnavailable
from peftplan.profile.run import check_gpu, open_session


def make_app() -> typer.Typer:
    app = typer.Typer(pretty_exceptions_enable=False)

    @app.callback()
    def main() -> None:
        """peftplan (test app)"""

    profile_cli.register(app)
    return app


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.mark.skipif(has_cuda(), reason="this machine has a GPU")
def test_no_gpu_one_line_exit_2():
    result = CliRunner().invoke(make_app(), ["profile", "--model", "opt-125m", "--method", "lora"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    line = lines[0]
    assert line.startswith("peftplan: error: cannot profile here")
    assert "no CUDA device" in line and "NVML library not found" in line
    assert "peftplan trace" in line
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)


def test_check_gpu_names_only_what_is_missing():
    cuda_torch = SimpleNamespace(version=SimpleNamespace(cuda="13.0"), __version__="2.11.0+cu130",
                                 cuda=SimpleNamespace(is_available=lambda: True))
    with pytest.raises(GpuUnavailable) as e:
        check_gpu(nvml=FakeNvml(missing=True), torch_module=cuda_torch)
    assert "NVML library not found" in str(e.value) and "CUDA" not in str(e.value)
    no_device = SimpleNamespace(version=SimpleNamespace(cuda="13.0"), __version__="2.11.0+cu130",
                                cuda=SimpleNamespace(is_available=lambda: False))
    with pytest.raises(GpuUnavailable, match="no CUDA device visible") as e:
        check_gpu(nvml=FakeNvml(), torch_module=no_device)
    assert "NVML" not in str(e.value)
    assert check_gpu(nvml=FakeNvml(), torch_module=cuda_torch) is None
    assert check_gpu(nvml=FakeNvml(missing=True), torch_module=cuda_torch, need_nvml=False) is None


def test_bad_input_is_one_line_exit_2():
    result = CliRunner().invoke(make_app(), ["profile", "--method", "lorra"])
    assert result.exit_code == 2 and "unknown method 'lorra'" in result.output
    result = CliRunner().invoke(make_app(), ["profile", "--batch-size", "1,x"])
    assert result.exit_code == 2 and "cannot read" in result.output


@pytest.fixture
def simulated(monkeypatch):
    """The command on the CPU stand-ins: a simulated device and the toy step."""
    from peftplan.planning import estimate
    from peftplan.profile import run

    card, fake = toy_card(), FakeCuda()
    session = open_session(fake, nvml=fake.nvml())

    class Scripted(ToyStepApi):
        def build_model(self, card_, plan, device="cpu", *, seed=0):
            fake.expect(script_from_estimate(estimate(card, plan)),
                        oom_stage="forward" if plan.batch_size >= 8 else None)
            return super().build_model(card_, plan, device, seed=seed)

    monkeypatch.setattr(profile_cli, "make_session", lambda device, nvml: session)
    monkeypatch.setattr(profile_cli, "STEP_API", Scripted())
    monkeypatch.setattr(run, "load_card", lambda name: card)
    return session


def test_profile_list_options_json_and_files(simulated, tmp_path):
    out = tmp_path / "measured"
    result = CliRunner().invoke(make_app(), [
        "profile", "-m", "toy-llama", "--method", "lora,full", "-b", "1,8", "-s", "8", "--steps", "1",
        "--warmup", "1", "--interval-ms", "1", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    start = result.output.index("[")
    end = result.output.rindex("]") + 1
    records = json.loads(result.output[start:end])
    assert [(r["plan"]["method"], r["plan"]["batch_size"], r["status"]) for r in records] == [
        ("lora", 1, "ok"), ("lora", 8, "does-not-fit"), ("full", 1, "ok"), ("full", 8, "does-not-fit")]
    assert len(list(out.glob("*.json"))) == 4
    assert "does not fit 2" in result.output


def test_profile_renders_tables_and_a_grid_file(simulated, tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_text('[[grid]]\nmodel = "toy-llama"\nmethod = ["lora", "adapter"]\nseq_len = 8\nsteps = 1\n')
    result = CliRunner().invoke(make_app(), ["profile", "--grid", str(grid), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert "peak.reserved" in result.output and "tokens/s" in result.output
    assert "errors over the grid" in result.output
    assert len(list((tmp_path / "o").glob("*.json"))) == 2


def test_profile_with_trace_adds_trace_rows(simulated, tmp_path):
    result = CliRunner().invoke(make_app(), ["profile", "-m", "toy-llama", "-s", "8", "--steps", "1", "--trace",
                                             "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output[result.output.index("["):result.output.rindex("]") + 1])[0]
    names = {r["name"] for r in record["comparison"]}
    assert "trace.peak.allocated" in names and record["traced"]["forward"] > 0


def test_unknown_card_is_an_input_error_before_any_gpu_work():
    result = CliRunner().invoke(make_app(), ["profile", "-m", "opt-125", "--method", "lora"])
    assert result.exit_code == 2 and "unknown model 'opt-125'" in result.output
    assert "cannot profile" not in result.output
