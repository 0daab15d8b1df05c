"""The report's per-GPU section: 1, 2, 4, 8 GPUs, sharded per-GPU breakdowns and the cost of each cluster."""
from __future__ import annotations

from peftplan.plan import Plan
from peftplan.planning.cards import load_card
from peftplan.planning.gpus import load_gpu
from peftplan.report.data import WORLD_SIZES, _gpu_info, per_gpu


def test_per_gpu_shards_and_prices_each_world_size():
    card, gpu = load_card("llama-2-13b"), _gpu_info("a100-80gb")
    plans = [Plan(method="full", seq_len=512), Plan(method="lora", seq_len=512)]
    pg = per_gpu(card, plans, gpu, tokens=10**8)
    b = pg.breakdown
    assert b.methods == tuple(f"{m} ×{w}" for m in ("full", "lora") for w in WORLD_SIZES)
    comp = dict(zip(b.components, b.bytes))
    frozen, states = comp["frozen_weights_bytes"], comp["optimizer_states_bytes"]
    # LoRA: the frozen base is sharded over W (within FSDP's per-tensor padding) ...
    for i, w in enumerate(WORLD_SIZES):
        assert abs(frozen[4 + i] * w - frozen[4]) <= frozen[4] * 0.001
    # ... full fine-tuning: optimizer states too; one GPU has no communication buffers, several do
    for i, w in enumerate(WORLD_SIZES):
        assert abs(states[i] * w - states[0]) <= states[0] * 0.001
    comm = comp["communication_bytes"]
    assert comm[0] == comm[4] == 0 and all(comm[5:8])  # LoRA peaks in forward/backward: units gathered in flight
    assert list(b.peak_bytes[:4]) == sorted(b.peak_bytes[:4], reverse=True)  # more GPUs, less per GPU
    price = load_gpu("a100-80gb").price_per_hour_usd
    for r in pg.rows:
        assert r.usd_per_hour == price * r.gpus
        assert r.strategy == ("none" if r.gpus == 1 else "fsdp")
    full = [r for r in pg.rows if r.method == "full"]
    assert all(abs(r.cost_usd - full[0].cost_usd) < 1e-6 * full[0].cost_usd for r in full)  # same GPU-hours
    assert not full[0].fits and full[-1].fits  # 13B full fine-tuning: not on one 80 GB card, on eight


def test_report_html_has_the_per_gpu_section():
    from peftplan.report import build_report

    page = build_report(["qwen2.5-0.5b"], ["a100-80gb"], methods=["lora"], tokens=10**8, measured_dir=None)
    assert "Past one GPU: per-GPU memory on 1, 2, 4, 8 GPUs" in page
    assert "peak/GPU GiB" in page and page.count("<td>fsdp</td>") == 3  # W = 2, 4, 8
