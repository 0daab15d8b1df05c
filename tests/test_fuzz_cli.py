"""Bad input never crashes and never hangs (issue 19, ../shared/fuzz/REPORT.md).

Every root cause of the fuzz report as a parametrized list of its reproductions, the accepted-but-wrong
list, and property-based runs (hypothesis) over command lines and mutated config.json files. Commands run
in-process through `peftplan.cli.run_app` (the console script's own error renderer), a few as real
subprocesses (encodings, a full stdout).
"""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftplan import cli
from peftplan.errors import ConfigError, PlanError, PlanValueError
from peftplan.plan import Plan

cli._register_optional()  # trace, check, profile, report, fit: the lazily registered commands too

LLAMA = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 128, "vocab_size": 1000, "max_position_embeddings": 512}
GPT2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 1000, "n_positions": 512}
OPT = {"model_type": "opt", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "ffn_dim": 128,
       "vocab_size": 1000, "max_position_embeddings": 512}
TIME_BOUND_S = 20.0


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.run_app([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def refused(argv, capsys, needle: str = "") -> str:
    code, out, err = run(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2, (argv, code, out[-500:], err[-500:])
    assert len(lines) == 1 and lines[0].startswith("peftplan: error: "), (argv, err)
    assert "Traceback" not in err
    assert needle in lines[0], (needle, lines[0])
    return lines[0]


def write_config(tmp_path: Path, cfg: dict | str, name: str = "m") -> str:
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    return str(d)


def with_(base: dict, **changes) -> dict:
    cfg = copy.deepcopy(base)
    for k, v in changes.items():
        if v is ...:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    return cfg


# ---------------------------------------------------------------- root causes, each with its reproductions

NUMBERS = [  # RC1, RC2, RC3, RC4: non-finite, negative and overflowing numbers on the command line
    (["estimate", "-m", "llama-2-7b", "--tokens", "nan"], "tokens"),
    (["estimate", "--tokens", "inf"], "tokens"),
    (["compare", "-m", "opt-125m", "--tokens", "inf"], "tokens"),
    (["compare", "-m", "opt-125m", "--tokens", "-1"], "tokens"),
    (["estimate", "-m", "opt-125m", "--gpu", "t4", "--tokens", "-1e8"], "tokens"),
    (["estimate", "-m", "opt-125m", "--tokens", "0.5"], "tokens"),
    (["estimate", "-m", "opt-125m", "--alpha", "nan", "--json"], "alpha"),
    (["estimate", "-m", "opt-125m", "--alpha", "inf"], "alpha"),
    (["estimate", "-m", "opt-125m", "--alpha", "-16"], "alpha"),
    (["estimate", "-m", "opt-125m", "--batch-size", "9" * 40], ""),
    (["estimate", "-m", "opt-125m", "--seq-len", "1" + "0" * 400], ""),
    (["estimate", "-m", "llama-3.1-405b", "--method", "full", "-b", "1" + "0" * 30, "-s", "1" + "0" * 30], ""),
    (["estimate", "-m", "opt-125m", "--r", "inf"], "--r"),
    (["estimate", "-m", "opt-125m", "--dropout", "nan"], "dropout"),
    (["estimate", "-m", "opt-125m", "--method", "full", "--dropout", "5"], "dropout"),
    (["trace", "-m", "opt-125m", "-b", "9" * 30], ""),
    (["trace", "-m", "llama-3.2-1b", "-s", "1099511627776", "--attention", "eager"], "sequence length"),
    (["report", "-m", "opt-125m", "--tokens", "nan", "-o", "{tmp}/r.html"], "tokens"),
    (["fit", "-m", "opt-125m", "-s", "1" + "0" * 30], ""),
]

USAGE = [  # D1, RC5 box: every usage error of every command is one line
    (["estimate", "--r", "abc"], "'abc' is not a valid int"),
    (["estimate", "--r", "1.5"], "--r"),
    (["estimate", "--rank", "3"], "No such option"),
    (["estimate", "--r"], "requires an argument"),
    (["estimate", "--json=1"], "does not take a value"),
    (["bogus"], "No such command"),
    (["estimate", "extra"], "unexpected extra argument"),
    (["trace", "--steps", "1.5"], "--steps"),
    (["check", "--tolerance", "x"], "--tolerance"),
    (["profile", "--interval-ms", "x"], "--interval-ms"),
    (["report", "-b", "x"], "--batch-size"),
    (["fit", "--json=2"], "does not take a value"),
    (["models", "--x"], "No such option"),
    (["gpus", "extra"], "unexpected extra argument"),
    (["estimate", "--method", "lo\nra"], "unknown method 'lo\\nra'"),
    (["estimate", "--method", "x" * 100_000], "more>"),
]

CONFIGS = [  # RC6, RC7, RC8, RC9, RC11, RC17, RC20 and the accepted-but-wrong config fields
    ("nan-size", with_(LLAMA, hidden_size=math.nan), "hidden_size"),
    ("inf-layers", with_(LLAMA, num_hidden_layers=math.inf), "num_hidden_layers"),
    ("head-dim-str", with_(LLAMA, head_dim="16"), "head_dim"),
    ("head-dim-nan", with_(LLAMA, head_dim=math.nan), "head_dim"),
    ("head-dim-0", with_(LLAMA, head_dim=0), "head_dim"),
    ("head-dim-dict", with_(LLAMA, head_dim={}), "head_dim"),
    ("kv-str", with_(LLAMA, num_key_value_heads="8"), "num_key_value_heads"),
    ("kv-0", with_(LLAMA, num_key_value_heads=0), "num_key_value_heads"),
    ("kv-not-dividing", with_(LLAMA, num_key_value_heads=3), "kv heads"),
    ("dropout-list", with_(LLAMA, attention_dropout=[0.1]), "attention_dropout"),
    ("dropout-str", with_(GPT2, resid_pdrop="0.1"), "resid_pdrop"),
    ("dropout-64.5", with_(OPT, dropout=64.5), "dropout"),
    ("dropout-neg", with_(GPT2, attn_pdrop=-1), "attn_pdrop"),
    ("heads-0", with_(LLAMA, num_attention_heads=0), "num_attention_heads"),
    ("heads-0-gpt2", with_(GPT2, n_head=0), "n_head"),
    ("d65", with_(LLAMA, hidden_size=65), "not a multiple"),
    ("d66-opt", with_(OPT, hidden_size=66), "not a multiple"),
    ("float-size", with_(LLAMA, hidden_size=64.5), "hidden_size"),
    ("float-layers", with_(GPT2, n_layer=2.5), "n_layer"),
    ("tie-str", with_(LLAMA, tie_word_embeddings="false"), "tie_word_embeddings"),
    ("bias-num", with_(LLAMA, attention_bias=1), "attention_bias"),
    ("pre-norm-nan", with_(OPT, do_layer_norm_before=math.nan), "do_layer_norm_before"),
    ("act-unknown", with_(LLAMA, hidden_act="swish2"), "swish2"),
    ("act-number", with_(GPT2, activation_function=3), "activation"),
    ("npos-neg", with_(GPT2, n_positions=-100), "n_positions"),
    ("npos-0", with_(LLAMA, max_position_embeddings=0), "max_position_embeddings"),
    ("proj-neg", with_(OPT, word_embed_proj_dim=-32), "word_embed_proj_dim"),
    ("type-vocab-neg", {"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "intermediate_size": 128, "vocab_size": 1000, "max_position_embeddings": 512,
                        "type_vocab_size": -2}, "type_vocab_size"),
    ("layers-1e12", with_(LLAMA, num_hidden_layers=10**12), "num_hidden_layers"),
    ("layers-1e6", with_(LLAMA, num_hidden_layers=10**6), "num_hidden_layers"),
    ("layers-1e300", with_(LLAMA, num_hidden_layers=1e300), "num_hidden_layers"),
    ("softcap-str", with_(LLAMA, model_type="gemma2", attn_logit_softcapping="x"), "attn_logit_softcapping"),
    ("scalar-nan", with_(LLAMA, model_type="gemma2", query_pre_attn_scalar=math.nan), "query_pre_attn_scalar"),
    ("rope-list", with_(LLAMA, rope_scaling=[1]), "rope_scaling"),
    ("name-list", with_(LLAMA, _name_or_path=["x"]), "_name_or_path"),
    ("model-type-int", with_(LLAMA, model_type=3), "model_type"),
    ("deep", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("binary", "\udcff", ""),
]


@pytest.mark.parametrize("argv, needle", NUMBERS, ids=[" ".join(a)[:60] for a, _ in NUMBERS])
def test_numbers_out_of_range_are_one_line(argv, needle, capsys, tmp_path):
    refused([a.replace("{tmp}", str(tmp_path)) for a in argv], capsys, needle)


@pytest.mark.parametrize("argv, needle", USAGE, ids=[" ".join(a)[:40] for a, _ in USAGE])
def test_usage_errors_are_one_line(argv, needle, capsys):
    line = refused(argv, capsys, needle)
    assert len(line) < 1100 and "\x1b" not in line


@pytest.mark.parametrize("name, cfg, needle", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_bad_config_json_is_one_line(name, cfg, needle, capsys, tmp_path):
    if name == "binary":
        d = tmp_path / "bin"
        d.mkdir()
        (d / "config.json").write_bytes(os.urandom(64) + b"\xff\xfe")
        path = str(d)
    else:
        path = write_config(tmp_path, cfg)
    for command in (["estimate"], ["compare"], ["fit", "--gpus", "t4"]):
        refused([*command, "-m", path], capsys, needle)


def test_config_errors_in_the_python_api(tmp_path):
    from peftplan.planning import estimate
    from peftplan.planning.cards import card_from_hf_config

    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        card_from_hf_config(with_(LLAMA, tie_word_embeddings="false"), name="x", source="x")
    with pytest.raises(ConfigError, match="hidden_size"):
        estimate(write_config(tmp_path, with_(LLAMA, hidden_size=64.5)))
    with pytest.raises(PlanValueError, match="tokens"):
        estimate("opt-125m", tokens=math.nan)
    with pytest.raises(PlanValueError, match="alpha"):
        estimate("opt-125m", alpha=math.inf)


def test_trace_configs_transformers_refuses_are_one_line(capsys, tmp_path):
    # RC16, RC17, RC22: what reaches the trace is either refused up front or one line, never a traceback
    refused(["trace", "-m", write_config(tmp_path, with_(LLAMA, hidden_act="swish2"), "a"), "-s", "8"], capsys)
    refused(["trace", "-m", write_config(tmp_path, with_(LLAMA, hidden_size=65), "b"), "-s", "8"], capsys)
    refused(["trace", "-m", write_config(tmp_path, with_(GPT2, n_positions=-100), "c"), "-s", "8"], capsys)
    refused(["trace", "-m", "llama-3.2-1b", "-b", "2147483648", "-s", "2147483648"], capsys)


def test_file_system_errors_are_one_line(capsys, tmp_path):
    # RC5 (name too long), RC10 (no permission), RC13/RC21 (binary, FIFO, device), missing measured dir
    refused(["estimate", "-m", "x" * 300], capsys)
    refused(["report", "-m", "opt-125m", "--measured-dir", "x" * 300, "-o", str(tmp_path / "r.html")], capsys)
    refused(["report", "-m", "opt-125m", "--measured-dir", str(tmp_path / "nope"), "-o", str(tmp_path / "r.html")],
            capsys, "--measured-dir")
    refused(["estimate", "-m", ""], capsys)
    (tmp_path / "bin.toml").write_bytes(os.urandom(256) + b"\xff")
    refused(["profile", "--grid", str(tmp_path / "bin.toml")], capsys, "not UTF-8")
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    refused(["profile", "--grid", str(fifo)], capsys, "not a regular file")
    refused(["profile", "--grid", "/dev/zero"], capsys)
    refused(["estimate", "-m", str(fifo.with_suffix(".json"))], capsys)
    md = tmp_path / "md"
    md.mkdir()
    os.mkfifo(md / "a.json")
    t0 = time.monotonic()
    code, out, err = run(["report", "-m", "opt-125m", "--measured-dir", str(md), "-o", str(tmp_path / "r.html"),
                          "--gpus", "t4", "--methods", "lora"], capsys)
    assert code == 0 and time.monotonic() - t0 < TIME_BOUND_S, err
    locked = write_config(tmp_path, LLAMA, "locked")
    if os.geteuid() == 0:  # root reads anything: the stat a non-root user gets (EACCES) is simulated
        real_stat = Path.stat

        def stat(self, *a, **k):
            if str(self).startswith(locked + "/"):
                raise PermissionError(13, "Permission denied", str(self))
            return real_stat(self, *a, **k)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(Path, "stat", stat)
            refused(["estimate", "-m", locked], capsys, "Permission denied")
    else:
        os.chmod(locked, 0)
        try:
            refused(["estimate", "-m", locked], capsys, "Permission denied")
        finally:
            os.chmod(locked, 0o755)


@pytest.mark.parametrize("name", ["[/]", "[/bold]", "[bold red]boom", "\x1b[2Jx", "a\nb"])
def test_markup_and_escapes_in_model_names(name, capsys, tmp_path):
    # RC12: a user's model name prints as itself in every table, never as markup or a raw escape
    path = write_config(tmp_path, with_(LLAMA, _name_or_path=name))
    for command in (["estimate"], ["compare"], ["fit", "--gpus", "t4"]):
        code, out, err = run([*command, "-m", path], capsys)
        assert code == 0, err
        assert "\x1b" not in out
        if name.startswith("["):
            assert name in out.replace("\n", "") or name[:4] in out


def test_work_is_bounded_unless_yes(capsys, tmp_path):
    # RC11, RC14, RC15, kind 6: refused in well under a second, with the bound named
    t0 = time.monotonic()
    refused(["profile", "-b", ",".join(map(str, range(1, 201))), "-s", ",".join(map(str, range(1, 201))),
             "--r", ",".join(map(str, range(1, 101)))], capsys, "--yes")
    grid = tmp_path / "g.json"
    grid.write_text(json.dumps({"grid": [{"model": "opt-125m", "batch_size": list(range(1, 1001)),
                                          "seq_len": list(range(1, 1001))}]}))
    refused(["profile", "--grid", str(grid)], capsys, "--yes")
    refused(["trace", "-m", "opt-125m", "-s", "8", "--steps", "1000000"], capsys, "--yes")
    refused(["trace", "-m", "llama-2-70b", "-s", "8", "--steps", "4"], capsys, "--yes")
    refused(["trace", "-m", write_config(tmp_path, with_(LLAMA, num_hidden_layers=2048)), "-s", "8"], capsys, "--yes")
    refused(["check", "-m", "opt-125m", "--batches", ",".join(map(str, range(1, 100))), "--seqs", "8,16,32"],
            capsys, "--yes")
    assert time.monotonic() - t0 < TIME_BOUND_S


def test_check_failing_configuration_is_a_row_and_one_line(capsys):
    # RC18, kind 7: the failing configuration is a row with its reason, then one stderr line, exit 2
    code, out, err = run(["check", "-m", "phi-3-mini", "--methods", "lora", "--batches", "1", "--seqs", "8",
                          "--checkpointing", "off"], capsys)
    assert code == 2 and "FAIL" in out and "no default LoRA targets" in out
    assert err.count("\n") == 1 and err.startswith("peftplan: error: 1 of 1 configurations failed")
    for bad in (["--checkpointing", "maybe"], ["--batches", ""], ["--methods", ""], ["--ranks", "x"],
                ["--tolerance", "nan"], ["--tolerance", "-1"]):
        refused(["check", "-m", "opt-125m", "--methods", "lora", "--batches", "1", "--seqs", "8", *bad], capsys)


# ---------------------------------------------------------------- accepted but wrong

ACCEPTED_WRONG = [
    (["compare", "-m", "opt-125m", "--targets", "all-linear,q_proj"], "all-linear"),
    (["estimate", "-m", "opt-125m", "--method", "full", "--targets", "re:("], "regex"),
    (["estimate", "-m", "opt-125m", "--method", "full", "--r", "-5"], "rank"),
    (["estimate", "-m", "opt-125m", "--targets", "q_proj,,"], ""),
    (["fit", "-m", "opt-125m", "--gpus", ""], "--gpus"),
    (["fit", "-m", "opt-125m", "--gpus", ","], "--gpus"),
    (["fit", "-m", "opt-125m", "--methods", ""], "--methods"),
    (["check", "-m", "opt-125m", "--checkpointing", "ON"], "checkpointing"),
]


@pytest.mark.parametrize("argv, needle", ACCEPTED_WRONG, ids=[" ".join(a)[:50] for a, _ in ACCEPTED_WRONG])
def test_formerly_accepted_inputs_are_refused(argv, needle, capsys):
    refused(argv, capsys, needle)


TINY_OPT = {"model_type": "opt", "hidden_size": 64, "num_hidden_layers": 6, "num_attention_heads": 4,
            "ffn_dim": 128, "vocab_size": 512, "max_position_embeddings": 128, "word_embed_proj_dim": 64,
            "do_layer_norm_before": True}
TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 5, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 512,
              "max_position_embeddings": 128}


def peft_trainable(cfg: dict, targets) -> int:
    """Trainable parameters peft's get_peft_model adds to the transformers model, built on meta."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("cfg, spec, peft_targets", [
    (TINY_OPT, "decoder.layers.0.self_attn.q_proj", ["decoder.layers.0.self_attn.q_proj"]),
    (TINY_OPT, "layers.5.self_attn.q_proj,layers.2.fc1", ["layers.5.self_attn.q_proj", "layers.2.fc1"]),
    (TINY_OPT, r"re:.*layers\.[0-2]\.self_attn\.(q|v)_proj", r".*layers\.[0-2]\.self_attn\.(q|v)_proj"),
    (TINY_LLAMA, "model.layers.4.mlp.down_proj,k_proj", ["model.layers.4.mlp.down_proj", "k_proj"]),
    (TINY_LLAMA, r"re:model\.layers\.(1|3)\.self_attn\..*", r"model\.layers\.(1|3)\.self_attn\..*"),
])
def test_block_specific_targets_count_what_peft_wraps(cfg, spec, peft_targets):
    from peftplan.planning import estimate
    from peftplan.planning.cards import card_from_hf_config

    card = card_from_hf_config(cfg, name="tiny", source="test")
    assert estimate(card, method="lora", r=4, targets=spec).params.added == peft_trainable(cfg, peft_targets)


# ---------------------------------------------------------------- the validation layer itself


def test_every_plan_field_has_a_validation_row():
    from peftplan.planning.validate import plan_table

    assert set(plan_table()) == {f.name for f in fields(Plan)}


def test_activation_names_are_transformers_own():
    from transformers.activations import ACT2CLS

    from peftplan.planning.validate import ACTIVATIONS

    assert set(ACTIVATIONS) == set(ACT2CLS)


def test_shipped_cards_pass_validation():
    from peftplan.planning.cards import registry, to_hf_config
    from peftplan.planning.validate import validate_config

    for card in registry().values():
        validate_config(to_hf_config(card))


@pytest.mark.parametrize("kw", [dict(r=True), dict(batch_size=1.0), dict(alpha="16"), dict(foreach="yes"),
                                dict(targets=["q_proj"]), dict(method=None), dict(seq_len=2**30)])
def test_plan_types_are_checked(kw):
    with pytest.raises(PlanValueError):
        Plan(**kw)


# ---------------------------------------------------------------- real processes: encodings and stdout


def subprocess_run(args, **env):
    return subprocess.run([sys.executable, "-m", "peftplan", *args], capture_output=True, timeout=120,
                          env={**os.environ, **env})


def test_ascii_terminal_and_full_stdout():
    # RC19, kind 8
    r = subprocess_run(["estimate", "-m", "opt-125m", "--gpu", "t4", "--dtype", "fp16", "--tokens", "1e8"],
                       PYTHONIOENCODING="ascii")
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr
    r.stdout.decode("ascii")
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "peftplan", "models"], stdout=full, stderr=subprocess.PIPE,
                           timeout=60)
    lines = r.stderr.decode().strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("peftplan: error:"), r.stderr


# ---------------------------------------------------------------- property-based


VALUE = st.one_of(
    st.integers(-10**6, 10**6).map(str), st.sampled_from(["nan", "inf", "-inf", "1e400", "9" * 40, "", " ",
                                                          "1.5", "0", "-1", "1e3", "0x10", "١٢", "[/]", "a\nb"]),
    st.text(max_size=12), st.floats(allow_nan=True).map(repr),
)
OPTIONS = ["--method", "--r", "--alpha", "--dropout", "--targets", "--adapter-size", "--adapter-placement",
           "--top-k", "-b", "-s", "--dtype", "--optimizer", "--attention", "--gpu", "--tokens", "--model"]
GOOD = {"--method": ["full", "top", "adapter", "lora", "qlora"], "--model": ["opt-125m", "gpt2", "llama-3.2-1b"],
        "--gpu": ["t4", "a100-40gb"], "--targets": ["all-linear", "q_proj", "re:.*v_proj"],
        "--dtype": ["fp16", "fp32"], "-s": ["8", "128", "4096"]}


@st.composite
def command_lines(draw):
    command = draw(st.sampled_from(["estimate", "compare", "fit"]))
    argv = [command, "-m", draw(st.sampled_from(GOOD["--model"]))]
    for _ in range(draw(st.integers(0, 4))):
        opt = draw(st.sampled_from(OPTIONS))
        if command != "estimate" and opt in ("--method", "--alpha", "--dropout", "--adapter-placement"):
            continue
        if command == "fit" and opt in ("--gpu", "--tokens", "-b"):
            continue
        good = GOOD.get(opt)
        value = draw(st.sampled_from(good)) if good and draw(st.booleans()) else draw(VALUE)
        argv += [opt, value]
    if command != "fit" or draw(st.booleans()):
        argv.append("--json")
    if command == "fit":
        argv[argv.index("-m") + 2:argv.index("-m") + 2] = ["--gpus", "t4", "--methods", "lora"]
    return argv


def assert_outcome(argv, code, out, err, seconds):
    assert code in (0, 2), (argv, code, err)
    assert "Traceback" not in err and seconds < TIME_BOUND_S, (argv, err, seconds)
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("peftplan: error: "), (argv, err)
    elif "--json" in argv:
        json.loads(out, parse_constant=lambda c: pytest.fail(f"{argv}: {c} in JSON"))


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(command_lines())
def test_property_command_lines(capsys, argv):
    t0 = time.monotonic()
    code, out, err = run(argv, capsys)
    assert_outcome(argv, code, out, err, time.monotonic() - t0)


FIELD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                         st.text(max_size=6), st.lists(st.integers(), max_size=2),
                         st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
                         st.sampled_from([0, 1, 2, 4, 8, 16, 64, 65, 10**6, 10**12, 0.5, "8", "false", "silu"]))
BASES = {"llama": LLAMA, "gpt2": GPT2, "opt": OPT}
FIELDS = sorted({k for b in BASES.values() for k in b} | {
    "head_dim", "num_key_value_heads", "n_inner", "word_embed_proj_dim", "tie_word_embeddings", "attention_bias",
    "hidden_act", "activation_function", "attention_dropout", "resid_pdrop", "dropout", "_name_or_path",
    "rope_scaling", "enable_bias", "do_layer_norm_before", "mlp_bias", "rms_norm_eps"})


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(base=st.sampled_from(sorted(BASES)), mutations=st.lists(st.tuples(st.sampled_from(FIELDS), FIELD_VALUES),
                                                              min_size=1, max_size=3))
def test_property_mutated_config_json(tmp_path_factory, capsys, base, mutations):
    cfg = copy.deepcopy(BASES[base])
    for key, value in mutations:
        cfg[key] = value
    d = tmp_path_factory.mktemp("cfg")
    (d / "config.json").write_text(json.dumps(cfg))
    argv = ["estimate", "-m", str(d), "--json"]
    t0 = time.monotonic()
    code, out, err = run(argv, capsys)
    assert_outcome(argv, code, out, err, time.monotonic() - t0)
    if code == 0:  # an accepted config: every figure finite and non-negative
        d = json.loads(out)
        assert d["params"]["base"] > 0 and d["peak_bytes"] > 0
        assert all(v >= 0 for m in d["phases"] for k, v in m.items() if k.endswith("_bytes")), d


def test_plan_error_kinds_are_plan_errors():
    from peftplan.errors import InputFileError, WorkTooLargeError

    for kind in (PlanValueError, ConfigError, InputFileError, WorkTooLargeError):
        assert issubclass(kind, PlanError)


def test_a_stray_file_named_like_a_card_does_not_shadow_it(capsys, tmp_path, monkeypatch):
    # D4: a file './opt-125m' in the working folder used to be read as the model's config.json
    monkeypatch.chdir(tmp_path)
    (tmp_path / "opt-125m").write_text("not json")
    code, out, err = run(["estimate", "-m", "opt-125m", "--json"], capsys)
    assert code == 0 and json.loads(out)["model"] == "opt-125m", err


@pytest.mark.parametrize("line, needle", [("d_model = 768.5", "d_model"), ("max_positions = -2048", "max_positions"),
                                          ("tie_embeddings = 1", "tie_embeddings"), ("n_kv_heads = 5", "n_kv_heads")])
def test_toml_cards_are_validated(tmp_path, line, needle):
    # a TOML card (shipped, or reached by path) gets the same checks as a config.json
    from peftplan.planning.cards import MODELS_DIR, ModelCard, load_card_file

    key = line.split(" = ")[0]
    text = "\n".join(line if ln.split(" = ")[0] == key else ln
                     for ln in (MODELS_DIR / "opt-125m.toml").read_text().splitlines())
    (tmp_path / "c.toml").write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_card_file(tmp_path / "c.toml", ModelCard, "card")


def test_report_output_places(capsys, tmp_path):
    # kind 3: -o under a file, onto a folder, into a missing folder (created), written atomically
    (tmp_path / "a_file").write_text("x")
    base = ["report", "-m", "opt-125m", "--gpus", "t4", "--methods", "lora"]
    refused([*base, "-o", str(tmp_path / "a_file" / "x.html")], capsys, "is a file, not a folder")
    refused([*base, "-o", str(tmp_path)], capsys, "it is a folder")
    out = tmp_path / "new" / "deeper" / "r.html"
    code, _, err = run([*base, "-o", str(out)], capsys)
    assert code == 0 and out.read_text().startswith("<!DOCTYPE html>"), err
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.html"]  # no temporary file left


@pytest.mark.parametrize("method, spec", [("lora", "decoder.layers.5.self_attn.q_proj"),
                                          ("qlora", r"re:.*layers\.(3|4|5)\..*")])
def test_block_specific_targets_memory_held_to_the_trace(method, spec):
    # blocks below the lowest wrapped one need no gradient and save nothing (the upper bound was +6 to +12%)
    from peftplan.planning import estimate
    from peftplan.planning.cards import load_card
    from peftplan.trace.check import compare
    from peftplan.trace.run import trace

    card = load_card("opt-125m")
    plan = Plan(method=method, r=8, targets=spec, batch_size=2, seq_len=128)
    assert abs(compare(estimate(card, plan), trace(card, plan)).peak_error) <= 0.01
