"""The HTML report: self-contained, escaped, complete, and rendered by a real headless Chromium."""
import json
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import FrozenInstanceError, replace
from html.parser import HTMLParser
from pathlib import Path

import pytest

from peftplan.errors import PlanError
from peftplan.plan import Plan
from peftplan.report import build_report, render_html, report_data
from peftplan.report.measured import read_measured

EVIL = "<script>alert(1)</script>"
HUGE = dict(model_type="llama", hidden_size=16384, num_hidden_layers=126, num_attention_heads=128,
            num_key_value_heads=8, intermediate_size=53248, vocab_size=128256, max_position_embeddings=8192,
            tie_word_embeddings=False)  # Llama-3.1-405B's shape: fits no single card
MODELS = ["opt-125m", "opt-6.7b"]
GPUS = ["t4", "a100-80gb"]
METHODS = ("full", "lora", "qlora")
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


# ---------------------------------------------------------------- fixtures


def measurement(model: str, plan: Plan, status: str = "ok"):
    """A result as the profiler writes it (the store's own dataclasses), with a timeline and a spike."""
    from peftplan.planning import estimate
    from peftplan.profile import store
    from peftplan.profile.compare import memory_rows, throughput_row
    from peftplan.profile.nvml import Spike

    est = estimate(model, plan, gpu="h100-sxm")
    env = store.Environment(
        gpu_name="NVIDIA H100 80GB HBM3", gpu_memory_bytes=80 * 2**30, gpu_card="h100-sxm", compute_capability="9.0",
        driver_version="550", cuda_version="12.4", torch_version="2.11", transformers_version="5.17",
        bitsandbytes_version=None, peft_version=None, python_version="3.12", peftplan_version="0.1.0")
    if status != "ok":
        return store.Measurement(model=model, plan=plan, settings=store.Settings(), status=status, environment=env,
                                 predicted=est.to_dict(), created_utc="2025-01-01T00:00:00")
    phases = tuple(store.PhaseMeasure(phase=m.phase, peak_allocated_bytes=int(m.tensor_bytes * 1.02),
                                      peak_reserved_bytes=int(m.reserved_bytes * 1.03), start_allocated_bytes=0,
                                      seconds=0.01, nvml_peak_bytes=int(m.device_bytes * 1.01)) for m in est.phases)
    steady = max(p.nvml_peak_bytes for p in phases)
    timeline = tuple((i * 0.005, int(steady * (0.6 + 0.4 * (i % 40) / 40))) for i in range(400))
    spike = Spike(t_s=1.0, duration_s=0.01, peak_bytes=int(steady * 1.1), excess_bytes=int(steady * 0.1),
                  phase="optimizer", step=0, phase_offset_s=0.001)
    nvml = store.NvmlSummary(interval_s=0.005, median_interval_s=0.005, n_samples=len(timeline), idle_bytes=0,
                             context_bytes=500 * 2**20, start_bytes=0, peak_bytes=spike.peak_bytes,
                             steady_peak_bytes=steady, phase_peak_bytes={}, spikes=(spike,), timeline=timeline,
                             marks=())
    timing = store.Timing(step_times_s=(0.1,), step_time_s=0.1, tokens_per_step=plan.tokens,
                          tokens_per_s=est.time.tokens_per_s * 0.9, flops_per_step=1.0, achieved_tflops=1.0,
                          peak_tflops=989.0, utilisation=0.3)
    m = store.Measurement(model=model, plan=plan, settings=store.Settings(), status="ok", environment=env,
                          weights_allocated_bytes=est.phases[0].frozen_weights_bytes, phases=phases, timing=timing,
                          nvml=nvml, predicted=est.to_dict(), created_utc="2025-01-01T00:00:00")
    return replace(m, comparison=memory_rows(m), throughput=throughput_row(m))


@pytest.fixture(scope="module")
def measured_dir(tmp_path_factory):
    from peftplan.profile import store

    d = tmp_path_factory.mktemp("measured")
    store.save(measurement("opt-125m", Plan(method="lora", batch_size=4)), d)
    store.save(measurement("opt-125m", Plan(method="full", batch_size=64, seq_len=2048), status="does-not-fit"), d)
    store.save(measurement("opt-1.3b", Plan(method="lora")), d)  # a model the report does not show
    (d / "broken.json").write_text("{not json")
    (d / "other.json").write_text(json.dumps({"schema": "something.else"}))
    (d / "newer.json").write_text(json.dumps({"schema": "peftplan.measured", "schema_version": 99, "model": "x"}))
    return d


@pytest.fixture(scope="module")
def evil_config(tmp_path_factory):
    d = tmp_path_factory.mktemp("evil")
    (d / "config.json").write_text(json.dumps(HUGE | {"_name_or_path": EVIL}))
    return str(d / "config.json")


@pytest.fixture(scope="module")
def page(measured_dir, evil_config):
    return build_report([*MODELS, evil_config], GPUS, methods=METHODS, seq_len=512, tokens=10**8,
                        measured_dir=measured_dir)


@pytest.fixture(scope="module")
def page_file(page, tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


class Tags(HTMLParser):
    """Every start tag with its attributes (script bodies are data, not tags)."""

    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def tags(html: str) -> list[tuple[str, dict]]:
    p = Tags()
    p.feed(html)
    return p.tags


# ---------------------------------------------------------------- the page


def test_no_external_script_style_or_link(page):
    found = tags(page)
    for tag, attrs in found:
        for key in ("src", "href", "srcset", "action", "data"):
            value = (attrs.get(key) or "").strip().lower()
            assert not value.startswith(("http:", "https:", "//", "ftp:")), (tag, key, value)
        assert tag != "link", "no stylesheet or preload links"
        if tag == "script":
            assert "src" not in attrs
    styles = re.findall(r"<style>(.*?)</style>", page, re.S)
    assert styles and not any(re.search(r"@import|url\(", s) for s in styles)


def test_plotly_js_is_embedded_once_and_every_plot_is_drawn(page):
    assert page.count("plotly.js v") == 1  # the bundle's own banner
    assert page.count("<script") == page.count("</script>")
    divs = re.findall(r'<div class="plot" id="(plot-\d+)">', page)
    calls = re.findall(r'Plotly\.newPlot\("(plot-\d+)"', page)
    assert divs and divs == calls
    # per model: breakdown, batch, sequence, rank, checkpointing, cost, per GPU; per method: fit; measured: 2 +
    # timeline
    assert len(divs) == 3 * 7 + len(METHODS) + 3


def test_user_names_are_escaped(page):
    assert EVIL not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "alert(1)</script>" not in page
    assert "\\u003cscript\\u003e" not in page  # figure JSON carries the escaped name, never the raw one


def test_a_model_that_fits_nowhere_is_shown_as_such(page):
    assert "(fits nowhere)" in page
    assert re.search(r"Fits no chosen GPU with any method.*&lt;script&gt;alert\(1\)", page)


def test_a_card_that_cannot_run_the_plan_is_noted_not_an_error(page):
    assert "has no bf16 tensor cores" in page  # the T4, in bf16: timed at its fp32 rate, and the page says so


def test_every_section_is_there(page):
    for anchor in ("breakdown", "fit", "curves", "cost", "measured"):
        assert f"id='{anchor}'" in page
    for text in ("peak memory by component", "what fits where", "LoRA rank sweep", "gradient checkpointing",
                 "throughput and cost", "predicted against measured", "NVML memory"):
        assert text in page
    assert page.count("<table>") >= 3 * 6 + len(METHODS)


def test_report_data_is_typed_and_consistent(measured_dir):
    d = report_data(["opt-6.7b"], ["rtx4090", "h100-sxm"], methods=("lora", "qlora"), seq_len=256, tokens=10**9,
                    measured_dir=measured_dir)
    s = d.sections[0]
    with pytest.raises(FrozenInstanceError):
        s.model = "x"
    b = s.breakdown
    for i in range(len(b.methods)):
        assert sum(row[i] for row in b.bytes) == b.peak_bytes[i]
    for series in (*s.by_batch.series, *s.by_seq.series, *s.ranks.peak_bytes, *s.ranks.trainable):
        assert list(series.y) == sorted(series.y)
    assert s.ranks.trainable[0].x[-1] == 256 and s.ranks.trainable[0].y[0] < s.ranks.trainable[0].y[-1]
    assert all(on < off for on, off in zip(s.checkpointing.peak_on_bytes, s.checkpointing.peak_off_bytes))
    assert all(c.cost_usd > 0 and c.gpu_hours > 0 for c in s.throughput.cells)
    assert d.measured.points == ()  # opt-6.7b was not measured there


def test_measured_results_are_read_defensively(measured_dir):
    m = read_measured(measured_dir, ["opt-125m"])
    assert m.files == 6
    assert {p.metric for p in m.points} >= {"peak.reserved", "peak.allocated", "peak.device", "tokens/s"}
    peak = next(p for p in m.points if p.metric == "peak.reserved")
    assert peak.error_percent == pytest.approx(100 * (peak.predicted - peak.measured) / peak.measured)
    assert len(m.timelines) == 1 and m.timelines[0].spike_phases == ("optimizer",)
    assert [f.status for f in m.failed] == ["does-not-fit"]
    assert m.other_models == 1
    assert len(m.skipped) == 3 and any("newer" in s or "99" in s for s in m.skipped)


def test_no_measured_results_is_said(tmp_path):
    page = build_report(["opt-125m"], ["t4"], methods=("lora",), measured_dir=tmp_path)
    assert "No measured results for these models" in page


@pytest.mark.parametrize("kwargs", [dict(models=["no-such-model"]), dict(gpus=["no-such-gpu"]),
                                    dict(methods=("lorax",)), dict(models=[]), dict(seq_len=0)])
def test_bad_input_is_a_plan_error(kwargs, tmp_path):
    args = dict(models=["opt-125m"], gpus=["t4"], methods=("lora",), measured_dir=tmp_path) | kwargs
    with pytest.raises(PlanError):
        build_report(args.pop("models"), args.pop("gpus"), **args)


def test_render_is_separate_from_compute(tmp_path):
    d = report_data(["opt-125m"], ["t4"], methods=("lora",), measured_dir=tmp_path)
    html = render_html(d, plotly_js="/* stand-in */")
    assert html.startswith("<!DOCTYPE html>") and "/* stand-in */" in html and len(html) < 200_000


# ---------------------------------------------------------------- the CLI


def cli(*args):
    return subprocess.run([sys.executable, "-m", "peftplan", *args], capture_output=True, text=True, timeout=120)


def test_cli_report_writes_the_file(tmp_path):
    out = tmp_path / "sub" / "r.html"
    r = cli("report", "--model", "opt-125m", "--gpus", "t4,a100-40gb", "--methods", "lora,qlora", "--seq-len",
            "256", "--tokens", "1e7", "-o", str(out), "--measured-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert out.is_file() and "peftplan capacity report: opt-125m" in out.read_text()


def test_cli_fit_json_and_table():
    r = cli("fit", "--model", "opt-125m", "--gpus", "t4", "--methods", "lora", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["cells"][0]["largest_batch"] > 0 and d["cells"][0]["fits"] is True
    r = cli("fit", "--model", "opt-125m", "--gpus", "t4,h100-sxm")
    assert r.returncode == 0 and "t4" in r.stdout and "qlora" in r.stdout


@pytest.mark.parametrize("args", [
    ("report", "--model", "no-such-model", "--gpus", "t4"),
    ("report", "--model", "opt-125m", "--gpus", "no-such-gpu"),
    ("report", "--gpus", "t4"),
    ("fit", "--model", "no-such-model"),
    ("fit", "--model", "opt-125m", "--gpus", "t4", "--methods", "lorax"),
])
def test_cli_bad_input_is_one_line_and_exit_2(args, tmp_path):
    r = cli(*args, *(("-o", str(tmp_path / "x.html")) if args[0] == "report" else ()))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("peftplan: error:")


# ---------------------------------------------------------------- a real browser


class PlotDom(HTMLParser):
    """Per plot div of the dumped DOM: does it hold plotly's main SVG, and how many shapes are drawn in it."""

    def __init__(self):
        super().__init__()
        self.plots: dict[str, dict] = {}
        self.stack: list[str | None] = []  # the plot id each open element belongs to

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        owner = self.stack[-1] if self.stack else None
        if tag == "div" and re.fullmatch(r"plot-\d+", a.get("id") or ""):
            owner = a["id"]
            self.plots[owner] = {"main_svg": 0, "shapes": 0, "traces": 0}
        if owner:
            p = self.plots[owner]
            classes = (a.get("class") or "").split()
            p["main_svg"] += tag == "svg" and "main-svg" in classes
            p["shapes"] += tag in ("path", "rect", "image")
            p["traces"] += tag == "g" and ("trace" in classes or "hm" in classes)
        if tag not in ("br", "img", "input", "meta", "link", "hr"):
            self.stack.append(owner)

    def handle_endtag(self, tag):
        if self.stack and tag not in ("br", "img", "input", "meta", "link", "hr"):
            self.stack.pop()


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_headless_chromium_renders_every_plot_without_console_errors(page_file, tmp_path):
    shot = tmp_path / "report.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
           "--host-resolver-rules=MAP * ~NOTFOUND",  # no network: anything fetched from outside would fail
           "--virtual-time-budget=15000", "--window-size=1400,4000", "--hide-scrollbars",
           f"--screenshot={shot}", "--dump-dom", page_file.as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    console = [line for line in r.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    assert "ERR_NAME_NOT_RESOLVED" not in r.stderr and "net::ERR" not in r.stderr

    dom = PlotDom()
    dom.feed(r.stdout)
    expected = re.findall(r'<div class="plot" id="(plot-\d+)">', page_file.read_text())
    assert sorted(dom.plots) == sorted(expected)
    empty = {k: v for k, v in dom.plots.items() if not (v["main_svg"] and v["shapes"] > 10 and v["traces"])}
    assert not empty, empty

    width, height = png_size(shot)
    assert (width, height) == (1400, 4000)
    assert shot.stat().st_size > 50_000  # a blank page compresses to a few kB
