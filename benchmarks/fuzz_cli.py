"""A generated corpus of careless command lines and config.json files through the `peftplan` CLI.

Every input runs in-process through `peftplan.cli.run_app` (the console script's error renderer) and is
classified:

    accepted     exit 0, and with --json strict JSON on stdout (no NaN/Infinity), no negative figure
    refused      exit 2, exactly one stderr line `peftplan: error: ...`
    traceback    an exception escaped the renderer (BAD)
    timeout      took longer than the per-input bound (BAD)
    bad-json     exit 0 with --json but stdout is not strict JSON (BAD)
    bad-output   exit 0 with a negative or non-finite figure, or a refusal of more than one line (BAD)
    bad-rc       any other exit code (BAD)

A sample of the corpus also runs as real subprocesses (the installed entry point, `python -m peftplan`)
as a check that the in-process run sees what a user sees.

    python benchmarks/fuzz_cli.py [--n 3000] [--seed 19] [--subprocess 40]
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peftplan import cli  # noqa: E402

PER_INPUT_S = 20.0
NUMS = ["nan", "inf", "-inf", "-1", "0", "1", "1.5", "1e8", "-1e8", "1e400", "9" * 40, "", " ", "abc", "0x10",
        "1_000", "+5", "١٢", "[/]", "a\nb", "\x1b[2J", "x" * 5000, "2147483648", "65536", "4096", "768"]
CHOICES = {"--method": ["full", "top", "adapter", "lora", "qlora", "LoRA", "magic"],
           "--dtype": ["bf16", "fp16", "fp32", "int8"], "--optimizer": ["adamw", "sgd", "adamw8bit", "adam"],
           "--attention": ["sdpa", "eager", "flash"], "--adapter-placement": ["houlsby", "ffn", "both"],
           "--gpu": ["t4", "a100-40gb", "h100-sxm", "h100x", ""],
           "--targets": ["all-linear", "q_proj", "re:.*v_proj", "re:(", "all-linear,q_proj",
                         "decoder.layers.0.self_attn.q_proj", "layers.5.self_attn.q_proj", "nonexistent", ",",
                         "lm_head"],
           "--model": ["opt-125m", "gpt2", "llama-3.2-1b", "phi-3-mini", "opt-6.7x", "", "x" * 300, "[/]"]}
INT_OPTS = ["--r", "--adapter-size", "--top-k", "-b", "-s"]
FLOAT_OPTS = ["--alpha", "--dropout", "--tokens"]
FLAGS = ["--grad-checkpointing", "--no-foreach", "--no-double-quant", "--json", "--json=1", "--rank", "-r"]
BASES = {
    "llama": {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 128, "vocab_size": 1000, "max_position_embeddings": 512},
    "gpt2": {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 1000, "n_positions": 512},
    "opt": {"model_type": "opt", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "ffn_dim": 128, "vocab_size": 1000, "max_position_embeddings": 512},
    "bert": {"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 128, "vocab_size": 1000, "max_position_embeddings": 512},
}
FIELDS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
          "max_position_embeddings", "n_embd", "n_layer", "n_head", "n_positions", "n_inner", "ffn_dim", "head_dim",
          "num_key_value_heads", "word_embed_proj_dim", "type_vocab_size", "tie_word_embeddings", "attention_bias",
          "mlp_bias", "enable_bias", "do_layer_norm_before", "hidden_act", "activation_function", "attention_dropout",
          "resid_pdrop", "attn_pdrop", "dropout", "hidden_dropout_prob", "rope_scaling", "_name_or_path",
          "model_type", "rms_norm_eps"]
VALUES = [None, True, False, 0, 1, -1, 2, 3, 8, 16, 65, 64.5, 1e12, 10**30, 1e300, math.nan, math.inf, -math.inf,
          "8", "false", "silu", "swish2", "", [1], {"a": 1}, {}, "[/]", "\x1b[31m"]


def command_line(rng: random.Random, tmp: Path, configs: list[str]) -> list[str]:
    command = rng.choice(["estimate"] * 6 + ["compare"] * 2 + ["fit"] * 2 + ["models", "gpus", "report", "check",
                                                                             "profile", "trace", "bogus"])
    argv = [command]
    if command in ("models", "gpus", "bogus"):
        return argv + rng.choice([[], ["--json"], ["--x"], ["extra"]])
    model = rng.choice(CHOICES["--model"][:3] * 4 + CHOICES["--model"][3:] + configs)
    argv += ["-m", model]
    if command == "trace":  # kept to refusals and tiny shapes: a real trace takes seconds
        return argv + rng.choice([["-s", "8", "--steps", "1000000"], ["-b", "9" * 30], ["--r", "abc"],
                                  ["-m", "llama-2-70b", "--steps", "4"], ["--steps", "0"], ["--method", "magic"]])
    if command == "check":
        return argv + rng.choice([["--checkpointing", "maybe"], ["--batches", ""], ["--ranks", "x"],
                                  ["--tolerance", "nan"], ["--batches", ",".join(map(str, range(1, 200)))],
                                  ["--methods", ""]])
    if command == "profile":
        return argv + rng.choice([["-b", ",".join(map(str, range(1, 1001))), "-s", "1,2"], ["-b", "abc"],
                                  ["--method", "lorra"], ["--grid", "/dev/zero"], ["--grid", str(tmp / "nope")],
                                  ["--interval-ms", "x"]])
    if command == "report":
        argv += ["-o", str(tmp / "r.html"), "--gpus", "t4", "--methods", "lora"]
        return argv + rng.choice([["--tokens", rng.choice(NUMS)], ["--measured-dir", str(tmp / "nope")],
                                  ["-b", rng.choice(NUMS)], ["--gpus", ""]])
    if command == "fit":
        argv += ["--gpus", rng.choice(["t4", "t4,a100-40gb", "", ","]), "--methods", rng.choice(["lora", "full", ""])]
    for _ in range(rng.randint(0, 4)):
        kind = rng.random()
        if kind < 0.35:
            opt = rng.choice(list(CHOICES))
            argv += [opt, rng.choice(CHOICES[opt])]
        elif kind < 0.65:
            argv += [rng.choice(INT_OPTS), rng.choice(NUMS if rng.random() < 0.5 else ["1", "2", "8", "64", "512"])]
        elif kind < 0.9:
            argv += [rng.choice(FLOAT_OPTS), rng.choice(NUMS if rng.random() < 0.5 else ["0", "0.1", "16", "1e8"])]
        else:
            argv.append(rng.choice(FLAGS))
    if command in ("compare", "fit"):  # drop estimate-only options half of the time
        if rng.random() < 0.5:
            keep, i = argv[:3], 3
            while i < len(argv):
                opt = argv[i]
                step = 1 if opt in FLAGS or i + 1 >= len(argv) else 2
                if opt not in ("--method", "--alpha", "--dropout", "--adapter-placement", "--tokens", "--gpu", "-b"):
                    keep += argv[i:i + step]
                i += step
            argv = keep
    if rng.random() < 0.6 and "--json" not in argv:
        argv.append("--json")
    return argv


def config_file(rng: random.Random, tmp: Path, i: int) -> str:
    cfg = dict(BASES[rng.choice(sorted(BASES))])
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(FIELDS)
        value = rng.choice(VALUES) if rng.random() < 0.7 else rng.choice([2, 4, 8, 16, 64, 128, True, False, "gelu"])
        if value is None and rng.random() < 0.5:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    d = tmp / f"c{i}"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def special_file(rng: random.Random, tmp: Path, i: int) -> str:
    d = tmp / f"s{i}"
    d.mkdir()
    kind = rng.choice(["deep", "binary", "empty", "list", "nan", "truncated", "bom"])
    data = {"deep": b"[" * 100_000 + b"]" * 100_000, "binary": bytes(rng.randrange(256) for _ in range(64)),
            "empty": b"", "list": b"[1, 2]", "nan": b'{"model_type": "llama", "hidden_size": NaN}',
            "truncated": b'{"model_type": "llama", "hidd', "bom": b"\xef\xbb\xbf" + json.dumps(BASES["opt"]).encode()}
    (d / "config.json").write_bytes(data[kind])
    return str(d)


def negative_or_nonfinite(obj) -> bool:
    if isinstance(obj, dict):
        return any(negative_or_nonfinite(v) for k, v in obj.items() if k not in ("peak_error", "phase_errors"))
    if isinstance(obj, list):
        return any(negative_or_nonfinite(v) for v in obj)
    if isinstance(obj, float):
        return not math.isfinite(obj) or obj < 0
    return isinstance(obj, int) and not isinstance(obj, bool) and obj < 0


def classify(argv, code, out, err, seconds, exc) -> str:
    if exc is not None:
        return "traceback"
    if seconds > PER_INPUT_S:
        return "timeout"
    if code == 2:
        lines = err.strip().splitlines()
        return "refused" if len(lines) == 1 and lines[0].startswith("peftplan: error: ") else "bad-output"
    if code != 0:
        return "bad-rc"
    if "--json" in argv:
        try:
            doc = json.loads(out, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
        except ValueError:
            return "bad-json"
        if negative_or_nonfinite(doc):
            return "bad-output"
    return "accepted"


def run_in_process(argv: list[str]) -> tuple[int, str, str, float, BaseException | None]:
    out, err = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    exc = None
    code = -1
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.run_app(argv)
        except BaseException as e:  # noqa: BLE001 - what the benchmark counts
            exc = e
    return code, out.getvalue(), err.getvalue(), time.perf_counter() - t0, exc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=19)
    ap.add_argument("--subprocess", type=int, default=40)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    cli._register_optional()
    counts: collections.Counter = collections.Counter()
    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    bad: list[tuple[str, list[str], str]] = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        configs = [config_file(rng, tmp, i) for i in range(a.n // 3)]
        configs += [special_file(rng, tmp, i) for i in range(a.n // 50)]
        corpus = [["estimate", "-m", c, "--json"] for c in configs]
        n_config = len(corpus)
        corpus += [command_line(rng, tmp, configs[:50]) for _ in range(a.n - len(corpus))]
        reasons: collections.Counter = collections.Counter()
        slowest = 0.0
        for index, argv in enumerate(corpus):
            code, out, err, seconds, exc = run_in_process(argv)
            outcome = classify(argv, code, out, err, seconds, exc)
            slowest = max(slowest, seconds)
            counts[outcome] += 1
            by_kind["config.json" if index < n_config else argv[0]][outcome] += 1
            if outcome == "refused":
                reasons[" ".join(err.split(":", 2)[2].split()[:4])[:50]] += 1
            if outcome not in ("accepted", "refused"):
                bad.append((outcome, argv, (repr(exc) if exc else err)[-300:]))
        wall = time.perf_counter() - t_start
        sample = rng.sample(corpus, min(a.subprocess, len(corpus)))
        sub = collections.Counter()
        for argv in sample:
            t0 = time.perf_counter()
            try:
                r = subprocess.run([sys.executable, "-m", "peftplan", *argv], capture_output=True, text=True,
                                   timeout=PER_INPUT_S * 3, cwd=tmp)
                outcome = classify(argv, r.returncode, r.stdout, r.stderr, time.perf_counter() - t0,
                                   RuntimeError() if "Traceback" in r.stderr else None)
            except subprocess.TimeoutExpired:
                outcome = "timeout"
            sub[outcome] += 1
    print(f"fuzz corpus: {len(corpus)} inputs ({len(configs)} config.json files, "
          f"{len(corpus) - len(configs)} command lines), seed {a.seed}, in-process, {wall:.1f} s "
          f"({1e3 * wall / len(corpus):.1f} ms/input, slowest {slowest:.2f} s)")
    order = ["accepted", "refused", "traceback", "timeout", "bad-json", "bad-output", "bad-rc"]
    print(f"{'input kind':<14}" + "".join(f"{o:>11}" for o in order))
    for kind in sorted(by_kind):
        print(f"{kind:<14}" + "".join(f"{by_kind[kind][o]:>11}" for o in order))
    print(f"{'total':<14}" + "".join(f"{counts[o]:>11}" for o in order))
    print(f"subprocess sample ({sum(sub.values())} inputs): " + ", ".join(f"{o} {sub[o]}" for o in order if sub[o]))
    print("most common refusals: " + "; ".join(f"{r} ({n})" for r, n in reasons.most_common(12)))
    for outcome, argv, why in bad[:20]:
        print(f"BAD {outcome}: {argv!r:.200}: {why!r}")
    n_bad = sum(counts[o] for o in order[2:]) + sum(sub[o] for o in order[2:])
    print(f"BAD total: {n_bad}")
    sys.exit(1 if n_bad else 0)


if __name__ == "__main__":
    main()
