"""Plotly figure specs (plain `{"data": [...], "layout": {...}}` dicts) from the report's typed data.

Plain dicts, not `plotly.graph_objects`: the page embeds plotly.js and calls `Plotly.newPlot` on these, so
figure building costs no validation pass. Every user-provided string passes through `esc`: plotly.js decodes
HTML entities in its text, so an escaped name displays as typed and never as markup.
"""
from __future__ import annotations

from collections.abc import Sequence
from html import escape

from peftplan.render import COMPONENTS as COMPONENT_LABELS
from peftplan.planning.fit import FitMatrix
from peftplan.report.data import Breakdown, Checkpointing, GpuInfo, RankSweep, Sweep, Throughput
from peftplan.report.measured import HEADLINE, MeasuredPoint, Timeline

GIB = 2**30
METHOD_COLORS = {"full": "#d62728", "top": "#9467bd", "adapter": "#ff7f0e", "lora": "#1f77b4", "qlora": "#2ca02c"}
COMPONENT_COLORS = {
    "frozen_weights_bytes": "#9ecae1", "trainable_weights_bytes": "#3182bd", "gradients_bytes": "#fd8d3c",
    "optimizer_states_bytes": "#e6550d", "activations_bytes": "#74c476", "logits_bytes": "#31a354",
    "temporaries_bytes": "#bcbddc", "allocator_overhead_bytes": "#969696", "cuda_context_bytes": "#636363",
}
BASE_LAYOUT = {
    "font": {"family": "system-ui, -apple-system, 'Segoe UI', sans-serif", "size": 12},
    "margin": {"l": 60, "r": 20, "t": 30, "b": 50},
    "height": 380,
    "paper_bgcolor": "white",
    "plot_bgcolor": "#fafafa",
    "legend": {"orientation": "h", "y": -0.2},
    "hoverlabel": {"namelength": -1},
}


def esc(text: str) -> str:
    """Text for plotly.js: it decodes &lt; &gt; &amp; (and numeric entities) but not &quot;, and it reads
    a few tags (<b>, <br>, <a href>) in any string, so user text has its markup characters escaped."""
    return escape(text, quote=False)

PANEL_MARGIN = {"l": 60, "r": 20, "t": 50, "b": 50}  # room for panel titles below the mode bar


def gib(n: float) -> float:
    return round(n / GIB, 3)


def figure(title: str, data: list[dict], **layout) -> dict:
    """A spec: the page writes `title` as an HTML heading above the plot (escaped there, so pass it raw)."""
    return {"title": title, "data": data, "layout": BASE_LAYOUT | layout}


def color(method: str) -> str:
    return METHOD_COLORS.get(method, "#7f7f7f")


def capacity_lines(gpus: Sequence[GpuInfo], top_gib: float) -> tuple[list[dict], list[dict]]:
    """Dashed horizontal lines at each card's usable memory.

    Lines closer than a label's height share one label ("t4 15 · a10g, l4 22 GiB"), written above the
    highest line of the group, so labels never overlap however the axis is scaled.
    """
    by_gib: dict[float, list[str]] = {}
    for g in gpus:
        by_gib.setdefault(round(g.usable_memory_bytes / GIB, 1), []).append(g.name)
    groups: list[list[tuple[float, list[str]]]] = []
    for y, names in sorted(by_gib.items()):
        if groups and y - groups[-1][0][0] < 0.07 * top_gib:
            groups[-1].append((y, names))
        else:
            groups.append([(y, names)])
    shapes = [{"type": "line", "xref": "paper", "x0": 0, "x1": 1, "yref": "y", "y0": y, "y1": y,
               "line": {"color": "#444", "width": 1, "dash": "dash"}} for y in by_gib]
    notes = [{"xref": "paper", "x": 1, "xanchor": "right", "yref": "y", "y": grp[-1][0], "yanchor": "bottom",
              "text": esc(" · ".join(f"{', '.join(n)} {y:g}" for y, n in grp) + " GiB"), "showarrow": False,
              "font": {"size": 10, "color": "#333"}, "bgcolor": "rgba(255,255,255,0.8)", "borderpad": 0}
             for grp in groups]
    return shapes, notes


def y_top(curves_gib: Sequence[Sequence[float]], gpus: Sequence[GpuInfo]) -> float:
    """Upper end of a memory axis: the largest card with some room, unless a curve starts above it; curves
    beyond are cut (the table under the plot has every value)."""
    cards = max((g.usable_memory_bytes / GIB for g in gpus), default=0.0)
    highest = max((max(c) for c in curves_gib if c), default=0.0)
    lowest_start = max((c[0] for c in curves_gib if c), default=0.0)
    return min(highest, max(1.3 * cards, lowest_start)) * 1.08 or 1.0


def breakdown_figure(b: Breakdown, gpus: Sequence[GpuInfo]) -> dict:
    top = max([*(gib(v) for v in b.peak_bytes), *(gib(g.usable_memory_bytes) for g in gpus)])
    shapes, notes = capacity_lines(gpus, top)
    data = [
        {"type": "bar", "name": COMPONENT_LABELS.get(c, c), "x": list(b.methods), "y": [gib(v) for v in row],
         "marker": {"color": COMPONENT_COLORS.get(c)},
         "hovertemplate": "%{x}: %{y:.2f} GiB<extra>" + COMPONENT_LABELS.get(c, c) + "</extra>"}
        for c, row in zip(b.components, b.bytes) if any(row)
    ]
    return figure(
        f"{b.model}: peak memory by component (b = {b.batch_size}, s = {b.seq_len})", data, barmode="stack",
        shapes=shapes, annotations=notes, yaxis={"title": {"text": "GiB"}, "range": [0, top * 1.08]},
        legend={"orientation": "h", "y": -0.15, "traceorder": "normal"}, height=440)


def _fit_heatmap(fm: FitMatrix, method: str, kind: str, axis: str) -> dict:
    models = list(fm.models)
    z, text = [], []
    for m in models:
        zr, tr = [], []
        for c in fm.row(m, method):
            n, capped = (c.largest_batch, c.batch_capped) if kind == "batch" else (c.longest_seq, c.seq_capped)
            zr.append(0 if n == 0 else 1 + n.bit_length())
            tr.append("✗" if n == 0 else f"{'≥' if capped and kind == 'batch' else ''}{n:,}")
        z.append(zr)
        text.append(tr)
    labels = [esc(m) + (" (fits nowhere)" if fm.fits_nowhere(m, method) else "") for m in models]
    zmax = max(2, max((v for r in z for v in r), default=2))
    scale = [[0, "#f4c7c3"], [0.999 / zmax, "#f4c7c3"], [1 / zmax, "#e5f5e0"], [1, "#74c476"]]
    return {"type": "heatmap", "z": z, "x": [esc(g) for g in fm.gpus], "y": labels, "text": text,
            "texttemplate": "%{text}", "colorscale": scale, "zmin": 0, "zmax": zmax, "showscale": False,
            "xgap": 2, "ygap": 2,
            "hovertemplate": "%{y} on %{x}: %{text}<extra></extra>", "xaxis": f"x{axis}", "yaxis": f"y{axis}"}


def fit_figure(fm: FitMatrix, method: str) -> dict:
    data = [_fit_heatmap(fm, method, "batch", ""), _fit_heatmap(fm, method, "seq", "2")]
    height = 140 + 36 * len(fm.models)
    return figure(
        f"{method}: what fits where", data, height=height,
        xaxis={"domain": [0, 0.48], "automargin": True, "tickangle": -35},
        xaxis2={"domain": [0.52, 1], "automargin": True, "tickangle": -35},
        yaxis={"autorange": "reversed", "automargin": True},
        yaxis2={"autorange": "reversed", "anchor": "x2", "showticklabels": False},
        annotations=[_panel(0.24, f"largest batch b at s = {fm.seq_len}"), _panel(0.76, "longest sequence s at b = 1")],
        margin={"l": 20, "r": 20, "t": 50, "b": 40})


def _panel(x: float, text: str) -> dict:
    return {"xref": "paper", "x": x, "xanchor": "center", "yref": "paper", "y": 1, "yanchor": "bottom",
            "text": text, "showarrow": False, "font": {"size": 12}}


def _log2_axis(title: str, values: Sequence[int]) -> dict:
    return {"title": {"text": title}, "type": "log", "tickvals": list(values), "ticktext": [f"{v:,}" for v in values]}


def sweep_figure(s: Sweep, gpus: Sequence[GpuInfo]) -> dict:
    top = y_top([[gib(v) for v in x.y] for x in s.series], gpus)
    shapes, notes = capacity_lines(gpus, top)
    what = "batch size b" if s.field == "batch_size" else "sequence length s"
    data = [{"type": "scatter", "mode": "lines+markers", "name": x.name, "x": list(x.x), "y": [gib(v) for v in x.y],
             "line": {"color": color(x.name)}, "hovertemplate": "%{x:,}: %{y:.2f} GiB"} for x in s.series]
    values = s.series[0].x if s.series else ()
    return figure(
        f"{s.model}: peak against {what} ({s.fixed})", data, shapes=shapes, annotations=notes,
        xaxis=_log2_axis(what, values), yaxis={"title": {"text": "device peak, GiB"}, "range": [0, top]})


def rank_figure(r: RankSweep) -> dict:
    same = all(t.y == r.trainable[0].y for t in r.trainable)  # LoRA and QLoRA train the same matrices
    trainable = r.trainable[:1] if same else r.trainable
    data = [{"type": "scatter", "mode": "lines+markers", "x": list(t.x), "y": list(t.y),
             "name": "trainable" + ("" if same else f" ({t.name})"),
             "line": {"color": "#555" if same else color(t.name)}, "hovertemplate": "r = %{x}: %{y:,}"}
            for t in trainable]
    data += [{"type": "scatter", "mode": "lines+markers", "name": f"{p.name} peak", "x": list(p.x),
              "y": [gib(v) for v in p.y], "line": {"color": color(p.name)}, "xaxis": "x2", "yaxis": "y2",
              "hovertemplate": "r = %{x}: %{y:.2f} GiB"} for p in r.peak_bytes]
    axis = _log2_axis("LoRA rank r", list(r.trainable[0].x) if r.trainable else [])
    return figure(
        f"{r.model}: LoRA rank sweep (b = {r.batch_size}, s = {r.seq_len})", data,
        xaxis=axis | {"domain": [0, 0.42]}, xaxis2=axis | {"domain": [0.58, 1]},
        yaxis={"title": {"text": "trainable parameters"}, "type": "log"},
        yaxis2={"title": {"text": "device peak, GiB"}, "anchor": "x2", "rangemode": "tozero"},
        annotations=[_panel(0.21, "trainable parameters"), _panel(0.79, "device peak")], margin=PANEL_MARGIN)


def checkpointing_figure(c: Checkpointing) -> dict:
    data = [
        {"type": "bar", "name": "checkpointing off", "x": list(c.methods), "y": [gib(v) for v in c.peak_off_bytes],
         "marker": {"color": "#6baed6"}, "hovertemplate": "%{x}: %{y:.2f} GiB"},
        {"type": "bar", "name": "checkpointing on", "x": list(c.methods), "y": [gib(v) for v in c.peak_on_bytes],
         "marker": {"color": "#08519c"}, "hovertemplate": "%{x}: %{y:.2f} GiB"},
    ]
    return figure(
        f"{c.model}: gradient checkpointing off / on (b = {c.batch_size}, s = {c.seq_len})", data, barmode="group",
        yaxis={"title": {"text": "device peak, GiB"}})


def throughput_figure(t: Throughput, methods: Sequence[str], gpus: Sequence[str]) -> dict:
    cells = {(c.gpu, c.method): c for c in t.cells}
    names = [esc(g) for g in gpus]
    budget = t.tokens > 0
    data = []
    for m in methods:
        row = [cells[g, m] for g in gpus]
        data.append({"type": "bar", "name": m, "x": names, "marker": {"color": color(m)}, "legendgroup": m,
                     "y": [round(c.tokens_per_s) if c.fits and c.tokens_per_s else None for c in row],
                     "hovertemplate": "%{x}: %{y:,} tokens/s<extra>" + m + "</extra>"})
        data.append({"type": "bar", "name": m, "x": names, "marker": {"color": color(m)}, "legendgroup": m,
                     "showlegend": False, "xaxis": "x2", "yaxis": "y2",
                     "y": [(c.cost_usd if budget else c.usd_per_million_tokens) if c.fits else None for c in row],
                     "hovertemplate": "%{x}: $%{y:,.2f}<extra>" + m + "</extra>"})
    cost = f"USD for {t.tokens:,} tokens" if budget else "USD per million tokens"
    nothing = [] if any(c.fits and c.tokens_per_s for c in t.cells) else [
        {"xref": "paper", "yref": "paper", "x": 0.5, "y": 0.5, "showarrow": False,
         "font": {"size": 14, "color": "#8a1c12"}, "text": f"runs on no chosen GPU at b = {t.batch_size}, s = {t.seq_len}"}]
    return figure(
        f"{t.model}: throughput and cost (s = {t.seq_len}; bars only where b = {t.batch_size} fits)", data,
        barmode="group", xaxis={"domain": [0, 0.42]}, xaxis2={"domain": [0.58, 1]},
        yaxis={"title": {"text": "tokens/s"}}, yaxis2={"title": {"text": "USD"}, "anchor": "x2"},
        annotations=[_panel(0.21, "throughput, tokens/s"), _panel(0.79, cost), *nothing], margin=PANEL_MARGIN)


def measured_figure(points: Sequence[MeasuredPoint], unit: str) -> dict:
    """Predicted (x) against measured (y), one trace per figure name, with y = x; the headline memory
    figures are shown, the others one legend click away."""
    scale = (lambda v: v / GIB) if unit == "bytes" else (lambda v: v)
    shown = unit if unit != "bytes" else "GiB"
    top = max((scale(max(p.predicted, p.measured)) for p in points), default=1.0) * 1.05
    data = [{"type": "scatter", "mode": "lines", "name": "y = x", "x": [0, top], "y": [0, top],
             "line": {"color": "#888", "dash": "dash"}, "hoverinfo": "skip"}]
    for metric in sorted({p.metric for p in points}, key=lambda m: (m not in HEADLINE, m)):
        pts = [p for p in points if p.metric == metric]
        data.append({
            "type": "scatter", "mode": "markers", "name": esc(metric), "marker": {"size": 8},
            "visible": True if unit != "bytes" or metric in HEADLINE else "legendonly",
            "x": [round(scale(p.predicted), 4) for p in pts], "y": [round(scale(p.measured), 4) for p in pts],
            "text": [esc(f"{p.model} {p.label} on {p.gpu}: {p.error_percent:+.1f}%") for p in pts],
            "hovertemplate": "%{text}<br>predicted %{x:,.2f}, measured %{y:,.2f}<extra></extra>",
        })
    title = "memory: predicted against measured" if unit == "bytes" else "throughput: predicted against measured"
    return figure(title, data, height=420, xaxis={"title": {"text": f"predicted, {shown}"}, "range": [0, top]},
                  yaxis={"title": {"text": f"measured, {shown}"}, "range": [0, top]},
                  legend={"orientation": "v", "x": 1.02, "y": 1, "font": {"size": 11}})


def timeline_figure(t: Timeline) -> dict:
    data = [{"type": "scatter", "mode": "lines", "name": "NVML used", "x": list(t.t_s),
             "y": [gib(v) for v in t.used_bytes], "line": {"color": "#1f77b4", "width": 1, "shape": "hv"},
             "hovertemplate": "%{x:.3f} s: %{y:.3f} GiB<extra></extra>"}]
    if t.spike_t_s:
        data.append({"type": "scatter", "mode": "markers", "name": "spikes", "x": list(t.spike_t_s),
                     "y": [gib(v) for v in t.spike_bytes], "text": [esc(p) for p in t.spike_phases],
                     "marker": {"color": "#d62728", "size": 9, "symbol": "x"},
                     "hovertemplate": "spike at %{x:.3f} s (%{text}): %{y:.3f} GiB<extra></extra>"})
    shapes = [] if t.steady_peak_bytes is None else [
        {"type": "line", "xref": "paper", "x0": 0, "x1": 1, "yref": "y", "y0": gib(t.steady_peak_bytes),
         "y1": gib(t.steady_peak_bytes), "line": {"color": "#2ca02c", "width": 1, "dash": "dot"}}]
    return figure(
        f"NVML memory: {t.model} {t.label} on {t.gpu}", data, height=320, shapes=shapes,
        xaxis={"title": {"text": "time, s"}}, yaxis={"title": {"text": "device memory used, GiB"}})
