"""The CLI: real output, one-line errors with exit code 2, JSON schema, no torch on the planning path."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peftplan.planning.cards import to_hf_config, registry


def run(*args):
    return subprocess.run([sys.executable, "-m", "peftplan", *args], capture_output=True, text=True, timeout=120)


def test_estimate_json_opt67b_qlora():
    r = run("estimate", "--model", "opt-6.7b", "--method", "qlora", "--r", "16", "--gpu", "a100-40gb",
            "--tokens", "1e8", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["schema_version"] == 1
    assert d["params"]["base"] == 6_658_473_984
    assert d["params"]["trainable"] == 8_388_608
    assert d["peak_phase"] in ("forward", "backward", "optimizer")
    assert d["fits"] is True
    assert d["time"]["tokens_per_s"] > 0 and d["time"]["cost_usd"] > 0
    peak = max(d["phases"], key=lambda m: sum(v for k, v in m.items() if k.endswith("_bytes")))
    assert d["peak_bytes"] == sum(v for k, v in peak.items() if k.endswith("_bytes"))


def test_estimate_table_names_the_peak_phase():
    r = run("estimate", "--model", "llama-2-7b", "--method", "lora")
    assert r.returncode == 0, r.stderr
    assert "6,738,415,616" in r.stdout and "peak:" in r.stdout


def test_compare_models_gpus():
    r = run("compare", "--model", "opt-1.3b", "--gpu", "t4", "--dtype", "fp16")
    assert r.returncode == 0, r.stderr
    for m in ("full", "top", "adapter", "lora", "qlora"):
        assert m in r.stdout
    models = json.loads(run("models", "--json").stdout)
    assert {m["name"] for m in models} >= {"opt-6.7b", "llama-3.1-405b", "roberta-large"}
    assert next(m for m in models if m["name"] == "opt-6.7b")["params"] == 6_658_473_984
    assert "h100-sxm" in {g["name"] for g in json.loads(run("gpus", "--json").stdout)}


def test_planning_path_imports_no_torch():
    code = ("import sys, peftplan; peftplan.estimate('opt-6.7b', method='qlora', gpu='h100-sxm');"
            "from peftplan import cli; print(any(m in sys.modules for m in ('torch', 'transformers', 'bitsandbytes')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip()
    assert out == "False"


@pytest.mark.parametrize("args, needle", [
    (["--model", "opt-6.7x"], "unknown model 'opt-6.7x'; did you mean opt-6.7b"),
    (["--r", "0"], "rank r must be positive"),
    (["--r", "5000"], "exceeds"),
    (["--targets", "foo"], "match no Linear"),
    (["--method", "adapter", "--adapter-size", "0"], "adapter size must be positive"),
    (["--batch-size", "0"], "batch size must be positive"),
    (["--seq-len", "0"], "sequence length must be positive"),
    (["--gpu", "h100x"], "unknown gpu 'h100x'"),
    (["--method", "magic"], "unknown method"),
])
def test_bad_input_one_line_exit_2(args, needle):
    r = run("estimate", *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_bad_config_json(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    r = run("estimate", "--model", str(bad))
    assert r.returncode == 2 and "not valid JSON" in r.stderr
    bad.write_text(json.dumps({"model_type": "mamba", "hidden_size": 4}))
    r = run("estimate", "--model", str(tmp_path))
    assert r.returncode == 2 and "not supported" in r.stderr
    bad.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 5}))
    r = run("estimate", "--model", str(bad))
    assert r.returncode == 2 and "is not a multiple of the 5 attention heads" in r.stderr


def test_seq_beyond_positions_is_a_warning(tmp_path):
    r = run("estimate", "--model", "gpt2", "--seq-len", "4096")
    assert r.returncode == 0 and "warning" in r.stderr and "1024" in r.stderr


def test_config_json_folder_same_counts(tmp_path):
    cfg = to_hf_config(registry()["mistral-7b-v0.1"])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = run("estimate", "--model", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["params"]["base"] == 7_241_732_096


def test_card_import_file_is_a_model(tmp_path):
    """A card written by `card import -o FILE` plans like its config.json (`--model FILE.toml`)."""
    import json as _json

    src = Path(__file__).parent / "data" / "configs" / "smollm2-135m" / "config.json"
    env = dict(os.environ, PEFTPLAN_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "card.toml"
    r = subprocess.run([sys.executable, "-m", "peftplan", "card", "import", str(src), "-o", str(out)],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    via = [_json.loads(subprocess.run([sys.executable, "-m", "peftplan", "estimate", "-m", m, "--json"],
                                      capture_output=True, text=True, env=env, check=True).stdout)
           for m in (str(out), str(src))]
    assert via[0]["params"]["total"] == via[1]["params"]["total"] and via[0]["peak_bytes"] == via[1]["peak_bytes"]


def test_flash_attention_before_ampere_warns():
    from peftplan.planning import estimate

    assert any("FlashAttention-2" in w for w in estimate("opt-125m", attention="flash", dtype="fp16", gpu="t4").warnings)
    assert not any("FlashAttention-2" in w for w in estimate("opt-125m", attention="flash", gpu="a100-80gb").warnings)


def test_piped_tables_are_not_cut_to_80_columns():
    """Piped to a file, rich would lay out for 80 columns and cut the model table's names ("bert…"); the CLI
    lays out wide instead, and an explicit COLUMNS still wins."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    out = subprocess.run([sys.executable, "-m", "peftplan", "models"], capture_output=True, text=True, env=env,
                         check=True).stdout
    assert "bert-base" in out and "mixtral-8x7b" in out and "…" not in out
    narrow = subprocess.run([sys.executable, "-m", "peftplan", "models"], capture_output=True, text=True,
                            env={**env, "COLUMNS": "80"}, check=True).stdout
    assert "…" in narrow


def test_hub_id_of_a_shipped_card_is_that_card_and_others_are_refused():
    """`--model meta-llama/Llama-3.3-70B-Instruct` is the shipped card made from that config.json (its cited
    source); a Hub id without a card is still one line, exit 2, and nothing is downloaded."""
    from peftplan.planning.cards import hub_cards, load_card

    assert load_card("meta-llama/Llama-3.3-70B-Instruct").name == "llama-3.3-70b"
    assert load_card("Qwen/Qwen3-8B").name == load_card("qwen/qwen3-8b").name == "qwen3-8b"
    assert all(load_card(hub).name == name for hub, name in hub_cards().items())
    bad = subprocess.run([sys.executable, "-m", "peftplan", "estimate", "--model", "someone/not-a-card"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "local files only" in bad.stderr


def test_compare_states_its_shared_plan_and_each_methods_warnings():
    """compare runs one plan for every method: its caption says which, and a warning that concerns some methods
    only (peft's k-bit preparation turning checkpointing on, for QLoRA) is printed once, naming them."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "peftplan", "compare", "-m", "llama-3.1-8b", "-b", "4", "-s", "1024",
                          "--r", "32"], capture_output=True, text=True, env={**__import__("os").environ,
                                                                              "COLUMNS": "200"})
    assert res.returncode == 0, res.stderr
    assert "gradient checkpointing off" in res.stdout and "adamw" in res.stdout
    kbit = [ln for ln in res.stderr.splitlines() if "prepare_model_for_kbit_training" in ln]
    assert len(kbit) == 1 and kbit[0].startswith("peftplan: warning: qlora: "), res.stderr
    assert "does not use" not in res.stderr  # --r is every LoRA row's, not an error of the full row


def test_target_groups_collapse_a_repeated_stack_only():
    from peftplan.render import target_groups

    names = ["layer.0.SelfAttention.q", "layer.1.EncDecAttention.q"] + [
        f"encoder.block.{i}.layer.0.SelfAttention.q" for i in range(24)]
    assert target_groups(names) == ["layer.0.SelfAttention.q", "layer.1.EncDecAttention.q",
                                    "encoder.block.*.layer.0.SelfAttention.q (×24)"]
    assert target_groups(["self_attn.q_proj", "fc1"]) == ["self_attn.q_proj", "fc1"]
