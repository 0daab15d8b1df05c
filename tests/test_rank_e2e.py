"""End to end on the CPU: train a tiny model's LoRA with peft at r = 4 and r = 16, save both, run `peftplan rank`.

The synthetic task has a known answer: a teacher is the same tiny Llama with a planted rank-1 update on every
v_proj and up_proj; the LoRA student learns to match the teacher's next-token distribution (KL). Both ranks should
find the planted input direction, so their A matrices share their top direction (φ(1, 1) well above the random
baseline 1/d) and a rank below 16 suffices. AdamW's decoupled weight decay lets the random initialisation of A
fade, as it does over a long run.
"""
import json
import subprocess
import sys

import pytest

from test_report import CHROMIUM, PlotDom, png_size

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

D, V, LAYERS = 64, 32, 2
TARGETS = ["v_proj", "up_proj"]
STEPS, LR, WEIGHT_DECAY = 300, 2e-2, 1.0
RANKS = (4, 16)


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=D, intermediate_size=2 * D, num_hidden_layers=LAYERS, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=V, max_position_embeddings=64)


def teacher_of(base, planted_scale: float = 6.0):
    """The base model with W += b·aᵀ (|a| = 1, |b| = planted_scale) on every target: a rank-1 task."""
    import copy

    teacher = copy.deepcopy(base).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, mod in teacher.named_modules():
            if name.rsplit(".", 1)[-1] in TARGETS:
                a = torch.randn(D, generator=g)
                b = torch.randn(mod.weight.shape[0], generator=g)
                mod.weight += torch.outer(b / b.norm() * planted_scale, a / a.norm())
    return teacher


def train_lora(base, teacher, r: int, folder, base_path: str) -> int:
    """Train LoRA at rank r for STEPS steps and save it with peft; returns peft's trainable-parameter count."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(r)
    student = copy.deepcopy(base)
    student.name_or_path = base_path  # becomes base_model_name_or_path in adapter_config.json
    model = get_peft_model(student, LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=WEIGHT_DECAY)
    g = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(64):
        x = torch.randint(0, V, (8, 16), generator=g)
        with torch.no_grad():
            batches.append((x, teacher(input_ids=x).logits.log_softmax(-1)))
    first = last = None
    for step in range(STEPS):
        x, target = batches[step % len(batches)]
        logp = model(input_ids=x).logits.log_softmax(-1)
        loss = torch.nn.functional.kl_div(logp, target, log_target=True, reduction="batchmean")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        first = loss.item() if first is None else first
        last = loss.item()
    assert last < 0.2 * first, (first, last)  # it learned the task
    model.save_pretrained(str(folder))
    return model.get_nb_trainable_parameters()[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("rank_e2e")
    cfg = tiny_config()
    cfg.save_pretrained(root / "base")  # the base model's config.json, found through base_model_name_or_path
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(cfg).eval()
    teacher = teacher_of(base)
    counts = {r: train_lora(base, teacher, r, root / f"r{r}", str(root / "base")) for r in RANKS}
    return root, counts


@pytest.fixture(scope="module")
def ranked(trained):
    root, counts = trained
    html = root / "rank.html"
    r = subprocess.run([sys.executable, "-m", "peftplan", "rank", str(root / "r16"), str(root / "r4"), "--json",
                        "--html", str(html)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout), html, counts


def test_the_smaller_rank_learns_the_larger_ones_top_direction(ranked):
    d, _, _ = ranked
    assert (d["r1"], d["r2"]) == RANKS
    assert {k["name"] for k in d["kinds"]} == {"self_attn.v_proj", "mlp.up_proj"}
    for k in d["kinds"]:
        assert len(k["layers"]) == LAYERS
        assert k["median_diagonal"][0] > 0.5 and k["median_diagonal"][0] > 20 * k["random_diagonal"][0], k
        assert k["captured_rank"] >= 1
    assert d["recommended_r"] <= 16  # the acceptance bound; the planted rank-1 task gives more:
    assert d["recommended_r"] <= RANKS[0]


def test_memory_is_estimated_for_the_base_config_and_agrees_with_peft(ranked):
    d, _, counts = ranked
    m = d["memory"]
    assert m is not None and not d["notes"]
    # the planner's LoRA count for the base config.json equals what peft trained, at both ranks
    assert m["trainable_params"][:2] == [counts[4], counts[16]]
    assert m["saved_params"] == counts[16] - m["trainable_params"][2] > 0
    assert m["saved_bytes"] == m["peak_bytes"][1] - m["peak_bytes"][2] > 0


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_heatmaps_render_in_headless_chromium(ranked, tmp_path):
    d, html, _ = ranked
    shot = tmp_path / "rank.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
           "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=15000", "--window-size=1400,2000",
           "--hide-scrollbars", f"--screenshot={shot}", "--dump-dom", html.as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    console = [line for line in r.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    assert "net::ERR" not in r.stderr
    dom = PlotDom()
    dom.feed(r.stdout)
    assert len(dom.plots) == 2 * len(d["kinds"])  # a heatmap and a diagonal plot per module kind
    empty = {k: v for k, v in dom.plots.items() if not (v["main_svg"] and v["shapes"] > 10 and v["traces"])}
    assert not empty, empty
    assert r.stdout.count('class="hm"') >= len(d["kinds"])  # plotly drew the heatmaps
    assert "updatemenu" in r.stdout  # the layer selector
    assert png_size(shot) == (1400, 2000) and shot.stat().st_size > 30_000
