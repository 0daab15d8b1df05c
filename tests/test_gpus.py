"""Every shipped GPU card loads and is self-consistent; unknown names get a suggestion."""
import pytest

from peftplan.errors import PlanError
from peftplan.planning.gpus import GpuCard, gpu_registry, load_gpu, peak_tflops

GPUS = sorted(gpu_registry())
GIB = 2**30


def test_registry_covers_required_cards():
    required = {"t4", "v100-16gb", "v100-32gb", "a10g", "l4", "l40s", "rtx3090", "rtx4090", "rtx5090", "a100-40gb",
                "a100-80gb", "h100-pcie", "h100-sxm", "h200", "b200"}
    assert required <= set(GPUS), sorted(required - set(GPUS))


@pytest.mark.parametrize("name", GPUS)
def test_card_is_consistent(name):
    g = load_gpu(name)
    assert isinstance(g, GpuCard) and g.name == name
    assert 0 < g.usable_memory_bytes <= g.memory_bytes
    assert g.memory_bytes - g.usable_memory_bytes < 4 * GIB  # the driver reserves well under a few GiB
    if g.bf16_tflops and g.fp16_tflops:
        assert g.bf16_tflops >= 0.99 * g.fp16_tflops
    assert g.fp16_tflops > g.fp32_tflops > 0
    assert g.mem_bandwidth_gbs > 0 and g.price_per_hour_usd > 0
    assert g.source.startswith("https://")
    for dtype in ("fp16", "fp32"):
        assert peak_tflops(g, dtype) > 0


def test_case_insensitive():
    assert load_gpu("H100-SXM") is load_gpu("h100-sxm")


def test_unknown_gpu_suggests():
    with pytest.raises(PlanError, match="h100-sxm"):
        load_gpu("h100-sxn")


def test_no_bf16_is_one_line_error():
    with pytest.raises(PlanError, match="bf16") as e:
        peak_tflops(load_gpu("t4"), "bf16")
    assert "\n" not in str(e.value)
    assert peak_tflops(load_gpu("t4"), "fp16") == 65


def test_known_rates():
    assert peak_tflops(load_gpu("h100-sxm"), "bf16") == 989
    assert peak_tflops(load_gpu("a100-80gb"), "bf16") == 312
    assert load_gpu("a100-80gb").memory_bytes == 80 * GIB


def test_no_torch_import():
    import subprocess
    import sys

    code = "import sys, peftplan.planning.gpus as g; g.gpu_registry(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
