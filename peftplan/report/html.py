"""Render a `ReportData` as one self-contained HTML page.

plotly.js is embedded once, inline; the page references no external script, style, font or image, so it
opens offline. Each plot has a plain HTML table of the same numbers under it. Every user-provided string
(model names come from any config.json) is escaped with `html.escape`; figure JSON is escaped for <script>.
"""
from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from html import escape as esc
from pathlib import Path

from peftplan.planning.cards import PROFILES
from peftplan.planning.fit import FitCell
from peftplan.render import COMPONENTS as COMPONENT_LABELS
from peftplan.report import figures as fig
from peftplan.report.data import DEFAULT_METHODS, CostCell, ReportData, report_data
from peftplan.report.measured import HEADLINE, MEASURED_DIR, Measured, MeasuredPoint

PLOT_CONFIG = {"responsive": True, "displaylogo": False, "showLink": False}
PLAN_FIELDS = ("r", "alpha", "targets", "adapter_size", "adapter_placement", "top_k", "dtype", "optimizer",
               "foreach", "attention", "double_quant", "kbit_prep")

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, 'Segoe UI', sans-serif; color: #222; margin: 0; background: #f3f4f6; }
main { max-width: 1500px; margin: 0 auto; padding: 16px 24px 48px; }
h1 { font-size: 22px; margin: 8px 0; } h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 2px solid #ccc; }
h3 { font-size: 15px; margin: 18px 0 6px; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(600px, 1fr)); gap: 14px; }
.card { background: white; border: 1px solid #ddd; border-radius: 6px; padding: 8px 10px; overflow-x: auto;
        min-width: 0; }
.card h3 { margin: 4px 0; font-size: 14px; font-weight: 600; }
.plot { width: 100%; min-height: 300px; }
table { border-collapse: collapse; margin: 6px 0 4px; font-size: 12.5px; }
th, td { border: 1px solid #ddd; padding: 2px 8px; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
td.no { background: #fbe3e1; color: #8a1c12; } td.yes { background: #eef7ec; }
.note { color: #555; font-size: 13px; } .warn { color: #8a1c12; font-weight: 600; }
nav a { margin-right: 12px; } code { background: #eee; padding: 0 3px; border-radius: 3px; }
"""


# ---------------------------------------------------------------- small pieces


def script_json(obj) -> str:
    """JSON safe to place inside <script>: no '<', '>' or '&' can close the element or open a comment."""
    text = json.dumps(obj, separators=(",", ":"), allow_nan=False)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


class Plots:
    """Numbers the plot divs of one page and writes each one's newPlot call."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, spec: dict) -> str:
        self.count += 1
        div = f"plot-{self.count}"
        args = ",".join(script_json(x) for x in (div, spec["data"], spec["layout"], PLOT_CONFIG))
        # drawn once the page is laid out, so each plot takes its card's final width
        call = f'document.addEventListener("DOMContentLoaded",()=>Plotly.newPlot({args}));'
        return f'<h3>{esc(spec["title"])}</h3><div class="plot" id="{div}"></div>\n<script>{call}</script>'


def table(headers: Sequence[str], rows: Iterable[Sequence], classes: Iterable[Sequence[str]] | None = None) -> str:
    """A table of escaped cells; `classes` optionally gives each cell a CSS class."""
    head = "".join(f"<th>{esc(str(h))}</th>" for h in headers)
    body = []
    class_rows = iter(classes) if classes is not None else None
    for row in rows:
        cls = next(class_rows) if class_rows is not None else [""] * len(row)
        cells = "".join(f'<td class="{c}">{esc(str(v))}</td>' if c else f"<td>{esc(str(v))}</td>"
                        for v, c in zip(row, cls))
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def shown_path(path: str) -> str:
    """A path inside the project as relative to it: a committed report names no one's home folder."""
    try:
        return str(Path(path).resolve().relative_to(PROFILES.parent))
    except ValueError:
        return path


def card(plot: str, *parts: str) -> str:
    return f'<div class="card">{plot}{"".join(parts)}</div>'


def g(n: int) -> str:
    return f"{n / fig.GIB:,.2f}"


# ---------------------------------------------------------------- sections


def header(d: ReportData) -> str:
    models = ", ".join(d.models)
    settings = {"batch size b": d.batch_size, "sequence length s": d.seq_len,
                "token budget": f"{d.tokens:,}" if d.tokens else "none (cost per million tokens)"}
    settings |= {k: getattr(d.base, k) for k in PLAN_FIELDS}
    settings["targets"] = d.base.targets or "peft's defaults"
    nowhere = d.fits_nowhere()
    warn = (f'<p class="warn">Fits no chosen GPU with any method at b = 1, s = {d.seq_len}: '
            f"{esc(', '.join(nowhere))}.</p>") if nowhere else ""
    gpus = table(("GPU", "card", "usable GiB", "$/hour"),
                 [(x.name, x.full_name, g(x.usable_memory_bytes), f"{x.price_per_hour_usd:.2f}") for x in d.gpus])
    return (f"<h1>peftplan capacity report: {esc(models)}</h1>"
            f'<p class="note">From the analytic model of <code>peftplan estimate</code>: device peak = what NVML '
            "sees (tensors, allocator overhead, CUDA context). A plan fits a GPU when its peak is at most the card's "
            f"usable memory. Methods: {esc(', '.join(d.methods))}.</p>{warn}"
            f'<div class="grid"><div class="card"><h3>Plan</h3>{table(("setting", "value"), settings.items())}</div>'
            f'<div class="card"><h3>GPUs</h3>{gpus}</div></div>')


def breakdown_section(d: ReportData, plot: Plots) -> str:
    parts = ["<h2 id='breakdown'>1. Memory breakdown by method</h2>",
             '<p class="note">Components at the phase that sets the peak; dashed lines: each GPU\'s usable memory.</p>',
             '<div class="grid">']
    for s in d.sections:
        b = s.breakdown
        rows = [(COMPONENT_LABELS.get(c, c), *(g(v) for v in vals)) for c, vals in zip(b.components, b.bytes)]
        rows.append(("device peak (GiB)", *(g(v) for v in b.peak_bytes)))
        rows.append(("peak phase", *b.peak_phases))
        fits = "; ".join(f"{m}: {', '.join(c.gpu for c in d.fit.row(s.model, m) if c.fits) or 'none'}"
                         for m in b.methods)
        note = (f'<p class="note">Fits at b = 1, s = {d.seq_len}: {esc(fits)}.<br>{s.total_params:,} parameters '
                f"· card from {esc(s.source)}</p>")
        parts.append(card(plot(fig.breakdown_figure(b, d.gpus)), table(("GiB", *b.methods), rows), note))
    return "".join(parts) + "</div>"


def fit_text(c: FitCell) -> str:
    """'b ≤ 12 · s ≤ 8,192'; '✗' where batch 1 does not fit at the report's s; 's: all 2,048' at the positions cap."""
    batch = "✗" if not c.fits else f"b {'≥' if c.batch_capped else '≤'} {c.largest_batch:,}"
    seq = "s ✗" if c.longest_seq == 0 else (f"s: all {c.longest_seq:,}" if c.seq_capped else f"s ≤ {c.longest_seq:,}")
    return f"{batch} · {seq}"


def fit_section(d: ReportData, plot: Plots) -> str:
    fm = d.fit
    parts = ["<h2 id='fit'>2. What fits where</h2>",
             f'<p class="note">Largest micro-batch at s = {fm.seq_len} and longest sequence at b = 1 (up to the '
             "model's positions; 'all' when every position fits), by search over the estimate; ✗: not even "
             "batch 1 fits. "
             "Also <code>peftplan fit</code>.</p>"]
    for m in fm.methods:
        rows, classes = [], []
        for model in fm.models:
            cells = fm.row(model, m)
            label = model + (" (fits nowhere)" if fm.fits_nowhere(model, m) else "")
            rows.append((label, *(fit_text(c) for c in cells)))
            classes.append(("no" if fm.fits_nowhere(model, m) else "", *("yes" if c.fits else "no" for c in cells)))
        parts.append(card(plot(fig.fit_figure(fm, m)), table(("model", *fm.gpus), rows, classes)))
    return "".join(parts)


def _sweep_table(first: str, series) -> str:
    xs = series[0].x if series else ()
    rows = [(f"{x:,}", *(g(s.y[i]) if i < len(s.y) else "" for s in series)) for i, x in enumerate(xs)]
    return table((first, *(f"{s.name} GiB" for s in series)), rows)


def curves_section(d: ReportData, plot: Plots) -> str:
    parts = ["<h2 id='curves'>3. Peak memory against batch, sequence, LoRA rank and checkpointing</h2>"]
    for s in d.sections:
        r, c = s.ranks, s.checkpointing
        rank_rows = [(x, *(f"{t.y[i]:,}" for t in r.trainable), *(g(p.y[i]) for p in r.peak_bytes))
                     for i, x in enumerate(r.trainable[0].x)] if r.trainable else []
        rank_head = ("r", *(f"{t.name} trainable" for t in r.trainable), *(f"{p.name} GiB" for p in r.peak_bytes))
        ckpt_rows = [(m, g(a), g(b), f"{100 * (a - b) / a:.0f}%", f"+{100 * (f - 1):.0f}%")
                     for m, a, b, f in zip(c.methods, c.peak_off_bytes, c.peak_on_bytes, c.flops_ratio)]
        ckpt_head = ("method", "off GiB", "on GiB", "memory saved", "FLOPs per token")
        parts += [f"<h3>{esc(s.model)}</h3>", '<div class="grid">',
                  card(plot(fig.sweep_figure(s.by_batch, d.gpus)), _sweep_table("b", s.by_batch.series)),
                  card(plot(fig.sweep_figure(s.by_seq, d.gpus)), _sweep_table("s", s.by_seq.series)),
                  card(plot(fig.rank_figure(r)), table(rank_head, rank_rows)),
                  card(plot(fig.checkpointing_figure(c)), table(ckpt_head, ckpt_rows)), "</div>"]
    return "".join(parts)


def throughput_section(d: ReportData, plot: Plots) -> str:
    budget = f"cost of {d.tokens:,} tokens" if d.tokens else "cost per million tokens (no --tokens budget)"
    parts = ["<h2 id='cost'>4. Throughput and cost</h2>",
             f'<p class="note">tokens/s at the assumed utilisation of each method, and {esc(budget)} at the '
             f"card's indicative hourly price. Red cells: b = {d.batch_size} at s = {d.seq_len} does not fit that "
             "card (figures shown for comparison); n/a: the card cannot run the plan (see the note).</p>"]
    notes = sorted({f"{c.gpu}: {c.note}" for s in d.sections for c in s.throughput.cells if c.note})
    if notes:
        parts.append(f'<p class="warn">{"<br>".join(esc(n) for n in notes)}</p>')
    parts.append('<div class="grid">')
    gpus = [x.name for x in d.gpus]
    for s in d.sections:
        t = s.throughput
        cells = {(c.gpu, c.method): c for c in t.cells}
        rows = [(g, *(cost_text(cells[g, m], d.tokens) for m in d.methods)) for g in gpus]
        classes = [("", *("yes" if cells[g, m].fits and cells[g, m].tokens_per_s else "no" for m in d.methods))
                   for g in gpus]
        parts.append(card(plot(fig.throughput_figure(t, d.methods, gpus)), table(("GPU", *d.methods), rows, classes)))
    return "".join(parts) + "</div>"


def cost_text(c: CostCell, tokens: int) -> str:
    if c.tokens_per_s is None:
        return "n/a"
    cost = f"${c.cost_usd:,.2f}" if tokens else f"${c.usd_per_million_tokens:,.3f}/M"
    return f"{c.tokens_per_s:,.0f} tok/s · {cost}"


def _run_rows(points: Sequence[MeasuredPoint]) -> tuple[tuple[str, ...], list[tuple]]:
    """One row per measured run: the headline figures as 'predicted / measured (error)'."""
    metrics = [m for m in (*HEADLINE, "tokens/s") if any(p.metric == m for p in points)]
    runs: dict[str, dict] = {}
    for p in points:
        runs.setdefault(p.source, {"p": p})[p.metric] = p
    def show(p: MeasuredPoint) -> str:
        f = g if p.unit == "bytes" else (lambda v: f"{v:,.0f}")
        return f"{f(p.predicted)} / {f(p.measured)} ({p.error_percent:+.1f}%)"
    rows = [(r["p"].model, r["p"].gpu, r["p"].label, *(show(r[m]) if m in r else "" for m in metrics))
            for r in runs.values()]
    head = ("model", "GPU", "plan", *(f"{m}: predicted / measured" for m in metrics))
    return head, rows


def _error_summary(points: Sequence[MeasuredPoint]) -> str:
    lines = []
    for metric in (*HEADLINE, "tokens/s"):
        errs = [abs(p.error_percent) for p in points if p.metric == metric]
        if errs:
            lines.append(f"{metric}: n = {len(errs)}, median |error| {statistics.median(errs):.1f}%, "
                         f"max {max(errs):.1f}%")
    return "; ".join(lines)


def measured_section(m: Measured, plot: Plots) -> str:
    parts = ["<h2 id='measured'>5. Predicted against measured</h2>"]
    source = esc(shown_path(m.directory or str(MEASURED_DIR)))
    if not m.points and not m.timelines and not m.failed:
        parts.append(f'<p class="note">No measured results for these models under <code>{source}</code> '
                     f"({m.files} JSON file(s) there, {m.other_models} of other models). "
                     "<code>peftplan profile</code> on a GPU adds them.</p>")
    if m.points:
        parts.append(f'<p class="note">From <code>{source}</code>. {esc(_error_summary(m.points))}. '
                     "Memory in GiB; errors are signed, positive when the estimate is higher.</p>")
        head, rows = _run_rows(m.points)
        plots = [plot(fig.measured_figure([p for p in m.points if p.unit == u], u))
                 for u in ("bytes", "tokens/s") if any(p.unit == u for p in m.points)]
        parts.append('<div class="grid">' + "".join(card(x) for x in plots) + "</div>")
        parts.append(card("", table(head, rows)))
    if m.failed:
        rows = [(f.model, f.gpu, f.label, f.status, f.detail) for f in m.failed]
        parts.append("<h3>Runs that did not complete</h3>" + card("", table(("model", "GPU", "plan", "status",
                                                                                "failure"), rows)))
    if m.timelines:
        parts.append('<h3>NVML memory timelines</h3><div class="grid">')
        for t in m.timelines:
            rows = [(f"{ts:.4f}", ph, g(b)) for ts, b, ph in zip(t.spike_t_s, t.spike_bytes, t.spike_phases)]
            note = (f'<p class="note">{esc(t.source)}; dotted: the steady peak (held ≥ 50 ms); ×: spikes above '
                    "it.</p>")
            parts.append(card(plot(fig.timeline_figure(t)),
                              table(("spike at s", "phase", "GiB"), rows or [("none", "", "")]), note))
        parts.append("</div>")
    if m.skipped:
        parts.append(f'<p class="note">Skipped: {esc("; ".join(m.skipped))}</p>')
    return "".join(parts)


# ---------------------------------------------------------------- the page


def per_gpu_section(d: ReportData, plot: Plots) -> str:
    parts = ["<h2 id='per-gpu'>Past one GPU: per-GPU memory on 1, 2, 4, 8 GPUs</h2>"]
    for s in d.sections:
        pg = s.per_gpu
        if pg is None:
            continue
        b = pg.breakdown
        parts.append(f'<p class="note">{esc(s.model)} on {esc(pg.gpu)}, {esc(pg.strategy)} past one GPU: frozen '
                     "weights, gradients and optimizer states sharded; communication = units all-gathered in flight "
                     "and reduce-scatter buffers. Cost = W × the card's price; the GPU-hours of the token budget do "
                     "not change with W (data parallel, communication time not modelled).</p>")
        rows = [(r.method, r.gpus, r.strategy, g(peak), "yes" if r.fits else "no", f"{r.tokens_per_s:,.0f}",
                 f"{r.usd_per_hour:,.2f}", f"{r.cost_usd:,.0f}" if d.tokens else "—")
                for r, peak in zip(pg.rows, b.peak_bytes)]
        tab = table(("method", "GPUs", "strategy", "peak/GPU GiB", "fits", "tokens/s", "$/hour", "$ for budget"), rows)
        parts.append(card(plot(fig.breakdown_figure(b, [x for x in d.gpus if x.name == pg.gpu])), tab))
    return "".join(parts)


def render_html(d: ReportData, plotly_js: str | None = None) -> str:
    """The whole page. `plotly_js` defaults to the bundle shipped with the plotly package."""
    if plotly_js is None:
        from plotly.offline import get_plotlyjs

        plotly_js = get_plotlyjs()
    plot = Plots()
    body = "".join([header(d), breakdown_section(d, plot), fit_section(d, plot), curves_section(d, plot),
                    throughput_section(d, plot), per_gpu_section(d, plot), measured_section(d.measured, plot)])
    nav = "".join(f'<a href="#{a}">{t}</a>' for a, t in (
        ("breakdown", "breakdown"), ("fit", "what fits"), ("curves", "curves"), ("cost", "cost"),
        ("per-gpu", "per GPU"), ("measured", "measured")))
    title = esc(f"peftplan report: {', '.join(d.models)}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{title}</title>'
            f"<style>{CSS}</style><script>{plotly_js}</script></head>\n"
            f"<body><main><nav>{nav}</nav>{body}</main></body></html>\n")


def build_report(models: Sequence, gpus: Sequence, methods: Sequence[str] = DEFAULT_METHODS, seq_len: int = 512,
                 batch_size: int = 1, tokens: int = 0, base=None, measured_dir: Path | None = MEASURED_DIR) -> str:
    """The report page for models × GPUs × methods (pure: the caller writes the file)."""
    data = report_data(models, gpus, methods=methods, seq_len=seq_len, batch_size=batch_size, tokens=tokens,
                       base=base, measured_dir=measured_dir)
    return render_html(data)
