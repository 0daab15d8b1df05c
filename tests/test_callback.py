"""The Trainer callback on a real (CPU) Trainer run: the plan of the live model, per-step records, and one
result file that the profile store loads and the report draws as measured points."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from peftplan.integrations.transformers import PeftplanCallback, measure_components  # noqa: E402
from peftplan.measure.tiny import TINY_CONFIGS  # noqa: E402
from peftplan.profile.store import load  # noqa: E402
from peftplan.report.measured import read_measured  # noqa: E402


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 16, s: int = 24, vocab: int = 128) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, s), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**TINY_CONFIGS["llama"])
    cfg._name_or_path = "tiny-llama"
    return transformers.LlamaForCausalLM(cfg)


def run_trainer(model, tmp_path, **args):
    lines: list[str] = []
    cb = PeftplanCallback(output_dir=tmp_path / "measured", echo=lines.append)
    targs = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
        use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", optim="adamw_torch",
        dataloader_num_workers=0, **args)
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=Tokens(), callbacks=[cb])
    trainer.train()
    return cb, lines


def test_full_fine_tuning_cpu(tmp_path):
    model = tiny_llama()
    cb, lines = run_trainer(model, tmp_path)
    assert cb.plan.method == "full" and cb.plan.dtype == "fp32"
    assert (cb.plan.batch_size, cb.plan.seq_len, cb.plan.grad_accum) == (2, 24, 2)  # first batch, the args
    assert cb.plan.optimizer == "adamw" and cb.plan.foreach is True  # adamw_torch
    assert [s.step for s in cb.steps] == [1, 2, 3] and all(s.seq_len == 24 for s in cb.steps)
    assert all(s.peak_allocated_bytes is None for s in cb.steps)  # no CUDA: said, not invented
    assert any("predicted peak" in x for x in lines)
    m = load(cb.path)  # the profile store reads it back
    assert m.settings.tag == "trainer-callback" and len(m.steps) == 3
    assert any("no CUDA device" in w for w in m.warnings)
    rows = {r.name: r for r in m.comparison}
    # weights, gradients and AdamW states, measured tensor by tensor, against the estimate
    n_params = sum(p.numel() for p in model.parameters())
    assert rows["trainable_weights"].measured_bytes == 4 * n_params
    assert rows["optimizer_states"].measured_bytes >= 2 * 4 * n_params  # exp_avg, exp_avg_sq (+ step scalars)
    for name in ("trainable_weights", "gradients", "optimizer_states"):
        assert abs(rows[name].rel_error) < 0.05, (name, rows[name])
    # and the HTML report's reader draws it as measured points of this model
    measured = read_measured(tmp_path / "measured", [m.model])
    assert {p.metric for p in measured.points} >= {"trainable_weights", "optimizer_states"}


def test_peft_lora_cpu(tmp_path):
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                               task_type="CAUSAL_LM"))
    cb, _ = run_trainer(model, tmp_path)
    p = cb.plan
    assert (p.method, p.r, p.alpha, p.targets, p.adapter_dtype) == ("lora", 4, 8.0, "q_proj,v_proj", "fp32")
    m = load(cb.path)
    rows = {r.name: r for r in m.comparison}
    trainable = sum(x.numel() for x in model.parameters() if x.requires_grad)
    assert rows["trainable_weights"].measured_bytes == 4 * trainable
    assert rows["trainable_weights"].predicted_bytes >= 4 * trainable  # the estimate rounds each tensor to 512 B
    assert m.predicted["params"]["trainable"] == trainable  # the plan counts what peft made trainable
    assert not any("trainable parameters: measured" in w for w in m.warnings)


def test_measure_components_counts_storages_once():
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters())
    model(input_ids=torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long)).loss.backward()
    opt.step()
    c = measure_components(model, opt)
    n = sum(p.numel() for p in model.parameters())
    assert c["trainable_weights_bytes"] == 4 * n and c["gradients_bytes"] == 4 * n
    assert c["optimizer_states_bytes"] == 8 * n + 4 * len(list(model.parameters()))  # + a fp32 step per tensor
