"""Per-GPU memory under DDP, ZeRO and FSDP: DeepSpeed's own estimators, the PEFT case, bad input."""
from __future__ import annotations

import subprocess
import sys

import pytest

from peftplan.errors import PlanError
from peftplan.plan import Plan
from peftplan.planning import estimate
from peftplan.planning.distributed import deepspeed_zero2_model_states, deepspeed_zero3_model_states
from peftplan.planning.params import total_params, block_params
from peftplan.planning.cards import load_card

try:  # DeepSpeed installs CPU-only (a test extra); without it the cited formula stands in
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
except Exception:  # noqa: BLE001 - not installed, or no accelerator plugin
    estimate_zero2_model_states_mem_needs = estimate_zero3_model_states_mem_needs = None


def model_states(est, phase="optimizer") -> int:
    m = next(p for p in est.phases if p.phase == phase)
    return m.frozen_weights_bytes + m.trainable_weights_bytes + m.gradients_bytes + m.optimizer_states_bytes


def per_tensor_slack(est) -> int:
    """Our exact accounting rounds each tensor to 512 B and adds AdamW's fp32 `step` per tensor: DeepSpeed's
    estimator has neither. Bound: 4 tensors per parameter tensor × 512 B."""
    n_tensors = 9 * 2 * load_card(est.model).n_layers + 8
    return 4 * 512 * n_tensors * 2


@pytest.mark.parametrize("model,gpus,nodes", [("llama-2-7b", 8, 1), ("llama-3.1-8b", 4, 1), ("opt-13b", 16, 2),
                                             ("qwen2.5-1.5b", 2, 1)])
def test_zero2_full_equals_deepspeed(model, gpus, nodes):
    """Full fine-tuning, bf16 + AdamW under ZeRO-2: 2Ψ + 18Ψ/W, DeepSpeed's own figure."""
    plan = Plan(method="full", gpus=gpus, nodes=nodes, strategy="zero2")
    est = estimate(model, plan)
    psi = total_params(load_card(model))
    expected = deepspeed_zero2_model_states(psi, gpus // nodes, nodes)
    if estimate_zero2_model_states_mem_needs is not None:
        assert estimate_zero2_model_states_mem_needs(psi, gpus // nodes, nodes, cpu_offload=False)[1] == expected
    assert abs(model_states(est) - expected) <= per_tensor_slack(est)


@pytest.mark.parametrize("model,gpus", [("llama-2-7b", 8), ("llama-3.1-70b", 32)])
def test_zero3_full_against_deepspeed(model, gpus):
    """ZeRO-3: DeepSpeed's 4·largest_layer + 18Ψ/W. Where the definitions agree — the sharded model states —
    ours are 16Ψ/W (16-bit params and gradient partition, fp32 master, fp32 momentum and variance): DeepSpeed's
    estimator adds 2Ψ/W (a second 16-bit gradient copy stage3.py 0.19 does not keep) and counts the gathered
    parameters as 4 B × the largest layer, where we count the module in flight plus the prefetch bucket."""
    card = load_card(model)
    psi = total_params(card)
    largest = max(card.vocab_size * card.d_model, block_params(card))
    ds = deepspeed_zero3_model_states(psi, largest, gpus, 1)
    if estimate_zero3_model_states_mem_needs is not None:
        assert estimate_zero3_model_states_mem_needs(psi, largest, gpus, 1, cpu_offload=False,
                                                     cpu_offload_params=False)[1] == ds
    est = estimate(model, Plan(method="full", gpus=gpus, strategy="zero3"))
    ours = model_states(est)
    assert abs(ours + 2 * psi // gpus + 4 * largest - ds) <= per_tensor_slack(est)


@pytest.mark.parametrize("strategy", ["zero3", "fsdp"])
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_peft_frozen_sharded_states_only_for_adapters(strategy, method):
    one = estimate("llama-2-13b", Plan(method=method, batch_size=2, seq_len=512))
    eight = estimate("llama-2-13b", Plan(method=method, batch_size=2, seq_len=512, gpus=8, strategy=strategy))
    o1, o8 = (next(p for p in e.phases if p.phase == "optimizer") for e in (one, eight))
    assert abs(o8.frozen_weights_bytes - o1.frozen_weights_bytes / 8) <= 1  # frozen weights sharded
    n_adapters = one.params.trainable
    # gradients and optimizer states exist for the adapters only (fp32 here), sharded
    assert o8.gradients_bytes <= 4 * n_adapters / 8 * 1.1 + 1
    assert o8.optimizer_states_bytes <= (12 if strategy == "zero3" else 8) * n_adapters / 8 * 1.2 + 512 * 8000
    # activations are not sharded: each GPU runs its own micro-batch (FSDP's forward may peak when the last of
    # the 40 blocks is gathered, before it saves its own: all but about one block, never a shard)
    a1, a8 = (next(p for p in e.phases if p.phase == "forward") for e in (one, eight))
    assert a1.activations_bytes * 0.95 <= a8.activations_bytes <= a1.activations_bytes


def test_deepspeed_bucket_does_not_shrink_with_lora():
    """DeepSpeed's default reduce bucket (5e8 elements) dominates a LoRA run; the Trainer's 'auto' (d²) does not."""
    default = estimate("llama-3.1-8b", Plan(method="lora", gpus=4, strategy="zero2"))
    auto = estimate("llama-3.1-8b", Plan(method="lora", gpus=4, strategy="zero2", reduce_bucket_size=4096 ** 2))
    assert default.peak.communication_bytes == 2 * 500_000_000
    assert default.peak_bytes - auto.peak_bytes > 0.9 * 2**30


def test_ddp_keeps_a_bucket_copy_of_gradients():
    one = estimate("opt-1.3b", Plan(method="full"))
    two = estimate("opt-1.3b", Plan(method="full", gpus=2))
    assert two.strategy == "ddp"
    assert two.peak.communication_bytes == next(p for p in one.phases if p.phase == "optimizer").gradients_bytes


def test_offload_moves_states_to_cpu():
    on = estimate("llama-2-7b", Plan(method="full", gpus=4, strategy="zero3", offload="optimizer"))
    off = estimate("llama-2-7b", Plan(method="full", gpus=4, strategy="zero3"))
    assert next(p for p in on.phases if p.phase == "optimizer").optimizer_states_bytes == 0
    assert on.cpu_offload_bytes >= next(p for p in off.phases if p.phase == "optimizer").optimizer_states_bytes
    assert on.peak_bytes < off.peak_bytes


@pytest.mark.parametrize("kwargs,msg", [
    (dict(gpus=0), "--gpus"), (dict(gpus=4, nodes=3), "does not divide"), (dict(offload="optimizer"), "needs a ZeRO"),
    (dict(gpus=4, strategy="ddp", offload="optimizer+params"), "needs"), (dict(strategy="zero9"), "unknown strategy"),
    (dict(gpus=4, strategy="fsdp-hybrid"), "--nodes"),
])
def test_bad_input(kwargs, msg):
    with pytest.raises(PlanError, match=msg):
        estimate("opt-125m", Plan(**kwargs))


def test_one_gpu_strategy_warns():
    assert any("shards nothing" in w for w in estimate("opt-125m", Plan(strategy="zero3")).warnings)


def test_cli_one_line_errors():
    r = subprocess.run([sys.executable, "-m", "peftplan", "estimate", "--gpus", "4", "--nodes", "3"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_fewest_gpus_is_the_smallest_that_fits():
    from peftplan.planning.cluster import fewest_gpus, world_sizes

    plan = Plan(method="full", seq_len=2048, grad_checkpointing=True)
    o = fewest_gpus("llama-3.1-70b", plan, "h100-sxm", "fsdp")
    assert o.fits and o.peak_bytes <= o.usable_bytes
    sizes = world_sizes(8, 512)
    smaller = sizes[sizes.index(o.gpus) - 1]
    below = estimate("llama-3.1-70b", plan.with_(gpus=smaller, nodes=max(1, smaller // 8), strategy="fsdp"),
                     gpu="h100-sxm")
    assert not below.fits
    # ZeRO-2 replicates the 16-bit weights: a 70B full fine-tune never fits an 80 GB card
    assert not fewest_gpus("llama-3.1-70b", plan, "h100-sxm", "zero2").fits


def test_cheapest_cluster_ranks_by_cost_per_token():
    from peftplan.planning.cluster import cheapest_cluster

    cp = cheapest_cluster("llama-2-13b", Plan(method="lora", seq_len=1024), ["a100-80gb", "h100-sxm", "rtx4090"],
                          tokens=10**8)
    fitting = [o for o in cp.options if o.fits]
    per_token = [o.usd_per_hour / o.tokens_per_s for o in fitting]
    assert per_token == sorted(per_token) and cp.cheapest == fitting[0]
    assert len({(o.gpu, o.strategy, o.gpus) for o in cp.options}) == len(cp.options)
