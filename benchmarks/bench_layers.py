"""Benchmark: one training step with our LoRA/QLoRA layers vs the same step with peft's, same model, same process.

Target (issue 3): ours is not slower, i.e. ours/peft tokens per second ≥ 1 within noise. Both models share the
card, the seed (so the base weights), the targets, r, α, the dtypes (peft's adapters are fp32 under QLoRA, and
so are ours under k-bit preparation; fp32 everywhere for LoRA), the batch, the optimizer and `train_step`.
Rounds alternate ours/peft so machine-load drift hits both. Run: `python benchmarks/bench_layers.py [--device cuda]`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch

from peftplan.measure.step import build_model, make_batch, make_optimizer, train_step
from peftplan.measure.tiny import tiny_card
from peftplan.plan import Plan


def peft_model(card, plan: Plan, device):
    """The base model of the same seed with peft's LoRA (over the same NF4 Linear4bit bases for QLoRA)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from peftplan.inject import linear_modules
    from peftplan.layers import to_linear4bit
    from peftplan.planning.params import DEFAULT_TARGETS

    base, _ = build_model(card, plan.with_(method="full"), device)
    if plan.method == "qlora":
        for name, lin in linear_modules(base).items():
            parent, _, child = name.rpartition(".")
            setattr(base.get_submodule(parent), child, to_linear4bit(lin, double_quant=plan.double_quant))
        base.is_loaded_in_4bit = True  # what peft's dispatcher reads to pick its bnb Linear4bit LoRA layer
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    targets = plan.targets.split(",") if plan.targets else list(DEFAULT_TARGETS[card.model_type])
    config = LoraConfig(r=plan.r, lora_alpha=plan.alpha, lora_dropout=plan.dropout, target_modules=targets)
    return get_peft_model(base, config, autocast_adapter_dtype=True)


def step_seconds(model, plan, batch, optimizer, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    train_step(model, batch, optimizer, plan)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def compare(card, plan: Plan, device, rounds: int, warmup: int = 3) -> dict:
    ours, _ = build_model(card, plan, device)
    theirs = peft_model(card, plan, device)
    batch = make_batch(card, plan, device)
    runs = {"ours": (ours, make_optimizer(ours, plan)), "peft": (theirs, make_optimizer(theirs, plan))}
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == \
        sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(warmup + rounds):
        for name, (model, opt) in (runs.items() if i % 2 else reversed(runs.items())):
            t = step_seconds(model, plan, batch, opt, device)
            if i >= warmup:
                times[name].append(t)
    tps = {k: plan.tokens / statistics.median(v) for k, v in times.items()}
    return {"median_s": {k: statistics.median(v) for k, v in times.items()}, "tokens_per_s": tps,
            "ratio": tps["ours"] / tps["peft"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (1: on a shared 2-core machine 2 threads wait on each other)")
    args = parser.parse_args()
    device = torch.device(args.device)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    # small but not trivial: d = 128, L = 4, d_ff = 512 (gated), V = 1024, b·s = 4·64 tokens
    # (bf16 matmuls, which QLoRA's compute dtype forces, run ~10× slower than fp32 on a CPU without AVX512-BF16)
    card = tiny_card("llama", hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=512, vocab_size=1024, max_position_embeddings=256)
    shape = dict(r=16, alpha=32, batch_size=4, seq_len=64)
    plans = {
        "lora  (fp32, q,v)": Plan(method="lora", dtype="fp32", **shape),
        "lora  (fp32, all-linear)": Plan(method="lora", dtype="fp32", **shape,
                                         targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"),
        "qlora (bf16, q,v, kbit prep)": Plan(method="qlora", dtype="bf16", **shape),
    }
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, load {load:.1f}, "
          f"model llama d={card.d_model} L={card.n_layers} V={card.vocab_size}, {args.rounds} timed rounds each")
    for label, plan in plans.items():
        r = compare(card, plan, device, args.rounds)
        print(f"{label:30s} ours {r['median_s']['ours'] * 1e3:8.1f} ms/step {r['tokens_per_s']['ours']:9,.0f} tok/s | "
              f"peft {r['median_s']['peft'] * 1e3:8.1f} ms/step {r['tokens_per_s']['peft']:9,.0f} tok/s | "
              f"ours/peft {r['ratio']:.3f}")


if __name__ == "__main__":
    main()
