"""`--from FILE`: each config kind gives the plan its tool would run, field by field; bad files are one line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from peftplan.errors import PlanError
from peftplan.plan import Plan
from peftplan.sources import merge, plan_from_files, read_source

DATA = Path(__file__).parent / "data" / "configs"
MODEL = str((DATA.parent / "models" / "Llama-3.1-8B").resolve())


def fields_of(name: str) -> dict:
    s = read_source(DATA / name)
    return {**s.defaults, **s.fields}


def test_peft_adapter_config():
    s = read_source(DATA / "adapter_config.json")
    assert s.kind == "peft"
    assert s.fields == {"method": "lora", "r": 16, "alpha": 32.0, "dropout": 0.05,
                        "targets": "v_proj,q_proj,o_proj,k_proj", "use_dora": False}
    assert s.model == "meta-llama/Llama-3.1-8B"  # a Hub id: usable only with an explicit --model
    assert not s.unknown and not s.warnings


def test_bnb_config_makes_lora_qlora():
    s = read_source(DATA / "bnb_config.json")
    assert s.kind == "bnb" and s.fields == {"_load_in_4bit": True, "double_quant": True}
    m = merge([read_source(DATA / "adapter_config.json"), s])
    assert m.fields["method"] == "qlora" and m.fields["double_quant"] is True and "_load_in_4bit" not in m.fields


def test_trl_sft_config():
    s = read_source(DATA / "sft_config.yaml")
    assert s.kind == "trainer"
    assert s.fields == {"batch_size": 2, "grad_accum": 8, "autocast": "bf16", "grad_checkpointing": True,
                        "use_reentrant": False, "optimizer": "paged-adamw8bit", "foreach": True, "seq_len": 2048,
                        "max_grad_norm": 0.3}
    assert s.defaults["dtype"] == "bf16"  # assumed, and said so
    assert any("load dtype" in w for w in s.warnings)
    assert s.model == "../models/Llama-3.1-8B"


def test_training_arguments_json():
    f = fields_of("training_args.json")
    assert f == {"batch_size": 4, "grad_accum": 4, "autocast": "fp16", "dtype": "fp16", "grad_checkpointing": False,
                 "optimizer": "adamw", "foreach": True, "max_grad_norm": 1.0}
    w = read_source(DATA / "training_args.json").warnings
    assert any("torch_compile" in x for x in w)  # changes memory, not modelled: named


def test_axolotl_qlora():
    s = read_source(DATA / "axolotl_qlora.yml")
    assert s.kind == "axolotl"
    assert s.fields == {"method": "qlora", "r": 32, "alpha": 16.0, "dropout": 0.05, "targets": "all-linear",
                        "seq_len": 4096, "batch_size": 2, "grad_accum": 4, "dtype": "bf16", "autocast": "bf16",
                        "grad_checkpointing": True, "use_reentrant": False, "optimizer": "adamw8bit",
                        "foreach": True, "attention": "flash"}
    assert s.model == "../models/Llama-3.1-8B" and not s.unknown


def test_llamafactory_lora_defaults():
    """LLaMA-Factory's defaults: alpha = 2·rank, 'all' targets, checkpointing on (reentrant), fused AdamW."""
    f = fields_of("llamafactory_lora_sft.yaml")
    assert f == {"method": "lora", "r": 8, "alpha": 16.0, "dropout": 0.0, "targets": "all-linear", "dtype": "bf16",
                 "autocast": "bf16", "seq_len": 2048, "batch_size": 1, "grad_accum": 8, "grad_checkpointing": True,
                 "use_reentrant": True, "attention": "sdpa", "optimizer": "adamw", "foreach": False,
                 "max_grad_norm": 1.0}


def test_llamafactory_qlora():
    f = fields_of("llamafactory_qlora_sft.yaml")
    assert f["method"] == "qlora" and f["r"] == 16 and f["alpha"] == 32.0 and f["targets"] == "q_proj,v_proj"
    assert f["kbit_prep"] is False  # LLaMA-Factory does not call prepare_model_for_kbit_training
    assert f["attention"] == "flash" and f["optimizer"] == "paged-adamw8bit" and f["seq_len"] == 1024


def test_llamafactory_full_is_mixed_precision(tmp_path):
    """Without pure_bf16, LLaMA-Factory casts trainable weights to fp32: fp32 master weights under bf16 autocast."""
    p = tmp_path / "full.yaml"
    p.write_text("model_name_or_path: x\nstage: sft\nfinetuning_type: full\nbf16: true\n")
    assert {k: read_source(p).fields[k] for k in ("method", "dtype", "autocast")} == \
        {"method": "full", "dtype": "fp32", "autocast": "bf16"}
    p.write_text("model_name_or_path: x\nfinetuning_type: full\nbf16: true\npure_bf16: true\n")
    assert read_source(p).fields["dtype"] == "bf16" and read_source(p).fields["autocast"] == "none"


def test_freeze_is_top_k(tmp_path):
    p = tmp_path / "freeze.yaml"
    p.write_text("model_name_or_path: x\nfinetuning_type: freeze\nfreeze_trainable_layers: 4\n")
    f = read_source(p).fields
    assert f["method"] == "top" and f["top_k"] == 4


def test_flags_override_files_and_model_from_file():
    model, plan, _ = plan_from_files([DATA / "axolotl_qlora.yml"], Plan(), explicit={"r"}, model=None)
    assert model == MODEL or Path(model).resolve() == Path(MODEL)
    assert plan.method == "qlora" and plan.batch_size == 2 and plan.r == Plan().r  # r given as a flag: the flag wins


def test_explicit_model_wins_over_hub_id():
    model, plan, _ = plan_from_files([DATA / "adapter_config.json"], Plan(), model="llama-3.1-8b")
    assert model == "llama-3.1-8b" and plan.r == 16


def test_hub_id_without_model_is_an_error():
    with pytest.raises(PlanError, match="downloads nothing"):
        plan_from_files([DATA / "adapter_config.json"], Plan())


def test_contradictory_files(tmp_path):
    a = tmp_path / "a.json"
    a.write_text(json.dumps({"per_device_train_batch_size": 4}))
    b = tmp_path / "b.json"
    b.write_text(json.dumps({"per_device_train_batch_size": 8}))
    with pytest.raises(PlanError, match="contradictory"):
        merge([read_source(a), read_source(b)])


def test_unsupported_optimizer_needs_a_flag(tmp_path):
    p = tmp_path / "args.json"
    p.write_text(json.dumps({"per_device_train_batch_size": 1, "optim": "lion_32bit"}))
    with pytest.raises(PlanError, match="lion_32bit"):
        plan_from_files([p], Plan(), model="opt-125m")
    _, plan, _ = plan_from_files([p], Plan(), explicit={"optimizer"}, model="opt-125m")
    assert plan.optimizer == Plan().optimizer


BAD = {
    "not_yaml.yaml": "a: [1, 2\n",
    "list.yaml": "- 1\n- 2\n",
    "bf16_fp16.json": json.dumps({"per_device_train_batch_size": 1, "bf16": True, "fp16": True}),
    "neg_batch.json": json.dumps({"per_device_train_batch_size": -2}),
    "str_batch.yaml": "micro_batch_size: two\nbase_model: x\n",
    "float_rank.json": json.dumps({"peft_type": "LORA", "r": 1.5, "lora_alpha": 16}),
    "dropout.json": json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 1.5}),
    "ia3.json": json.dumps({"peft_type": "IA3", "target_modules": ["k_proj"]}),
    "qlora_no_4bit.yml": "base_model: x\nadapter: qlora\nmicro_batch_size: 1\n",
    "two_attn.yml": "base_model: x\nflash_attention: true\nsdp_attention: true\n",
    "unknown_kind.json": json.dumps({"hello": 1}),
    "nan.json": json.dumps({"per_device_train_batch_size": 1, "max_grad_norm": float("nan")}),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_files_are_one_line_errors(tmp_path, name):
    p = tmp_path / name
    p.write_text(BAD[name])
    with pytest.raises(PlanError) as e:
        plan_from_files([p], Plan(), model="opt-125m")
    assert "\n" not in str(e.value)


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(PlanError, match="cannot read"):
        read_source(tmp_path / "nope.yaml")
    b = tmp_path / "bin.yaml"
    b.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(PlanError):
        read_source(b)


def test_cli_from_flags_override_and_exit_codes(tmp_path):
    """The CLI: --from with an explicit flag; a Hub id without --model is one line, exit 2."""
    run = lambda *a: subprocess.run([sys.executable, "-m", "peftplan", *a], capture_output=True, text=True,  # noqa
                                    cwd=DATA)
    ok = run("estimate", "--from", "adapter_config.json", "--from", "bnb_config.json", "-m", "llama-3.1-8b",
             "--r", "8", "--json")
    assert ok.returncode == 0, ok.stderr
    plan = json.loads(ok.stdout)["plan"]
    assert plan["method"] == "qlora" and plan["r"] == 8 and plan["alpha"] == 32.0
    bad = run("estimate", "--from", "adapter_config.json")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
