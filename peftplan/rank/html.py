"""The φ heatmaps of a `RankAnalysis` as one self-contained HTML page (plotly.js embedded, no network).

Per module kind, as the paper's Figures 3–4: a heatmap of φ(i, j), i ≤ r1 against j ≤ r2, for one layer at a
time (a dropdown selects the layer, or the mean over layers), and φ(i, i) per layer with the threshold and the
random-subspace baseline. Pure: returns the page; the CLI writes it.
"""
from __future__ import annotations

from html import escape as esc

import numpy as np

from peftplan.rank.analyse import KindSummary, ModulePhi, RankAnalysis
from peftplan.report.figures import BASE_LAYOUT, esc as plotly_esc
from peftplan.report.html import CSS, Plots, table


def layer_label(layer: int | None) -> str:
    return "-" if layer is None else f"layer {layer}"


def heatmap_spec(kind: KindSummary, modules: list[ModulePhi], r1: int, r2: int) -> dict:
    """One heatmap trace per choice (mean over layers first, then each layer); a dropdown shows one."""
    choices = [("mean over layers", np.mean([np.array(m.phi) for m in modules], axis=0))]
    choices += [(layer_label(m.layer), np.array(m.phi)) for m in modules]
    traces, buttons = [], []
    for n, (label, z) in enumerate(choices):
        traces.append({"type": "heatmap", "z": np.round(z, 5).tolist(), "x": list(range(1, r2 + 1)),
                       "y": list(range(1, r1 + 1)), "zmin": 0, "zmax": 1, "colorscale": "Viridis",
                       "visible": n == 0, "name": plotly_esc(label),
                       "hovertemplate": "i=%{y}, j=%{x}: φ=%{z:.3f}<extra></extra>",
                       "colorbar": {"title": {"text": "φ"}}})
        buttons.append({"label": plotly_esc(label), "method": "update",
                        "args": [{"visible": [k == n for k in range(len(choices))]}]})
    layout = BASE_LAYOUT | {
        "xaxis": {"title": {"text": f"j (top-j directions of A, r = {r2})"}, "dtick": max(1, r2 // 16)},
        "yaxis": {"title": {"text": f"i (top-i directions of A, r = {r1})"}, "dtick": max(1, r1 // 16)},
        "margin": {"l": 70, "r": 20, "t": 40, "b": 50},
        "updatemenus": [{"buttons": buttons, "direction": "down", "x": 0, "xanchor": "left", "y": 1.13,
                         "yanchor": "top", "showactive": True}],
    }
    return {"title": f"{kind.name}: φ(i, j)", "data": traces, "layout": layout}


def diagonal_spec(kind: KindSummary, modules: list[ModulePhi], threshold: float) -> dict:
    i = list(range(1, len(kind.median_diagonal) + 1))
    data = [{"type": "scatter", "mode": "lines", "x": i, "y": np.round(m.diagonal, 5).tolist(),
             "name": plotly_esc(layer_label(m.layer)), "line": {"width": 1, "color": "rgba(31,119,180,0.35)"},
             "showlegend": False, "hovertemplate": plotly_esc(layer_label(m.layer)) + ": φ(%{x},%{x})=%{y:.3f}"
             "<extra></extra>"} for m in modules]
    data += [
        {"type": "scatter", "mode": "lines+markers", "x": i, "y": list(kind.median_diagonal),
         "name": "median over layers", "line": {"width": 3, "color": "#1f77b4"}},
        {"type": "scatter", "mode": "lines", "x": i, "y": list(kind.random_diagonal),
         "name": f"random subspaces (i/d, d = {kind.d_in})", "line": {"dash": "dot", "color": "#7f7f7f"}},
        {"type": "scatter", "mode": "lines", "x": [1, i[-1]], "y": [threshold, threshold],
         "name": f"threshold {threshold:g}", "line": {"dash": "dash", "color": "#d62728"}},
    ]
    layout = BASE_LAYOUT | {"xaxis": {"title": {"text": "i"}, "dtick": max(1, len(i) // 16)},
                            "yaxis": {"title": {"text": "φ(i, i)"}, "range": [0, 1.02]}}
    return {"title": f"{kind.name}: φ(i, i) per layer (captured rank {kind.captured_rank} in most layers)",
            "data": data, "layout": layout}


def summary_table(a: RankAnalysis) -> str:
    rows = [(k.name, len(k.layers), k.d_in, k.captured_rank, k.recommended_r,
             f"{k.median_diagonal[0]:.3f}", f"{k.random_diagonal[0]:.4f}") for k in a.kinds]
    return table(("module kind", "layers", "d_in", "captured rank (most layers)", "recommended r",
                  "median φ(1,1)", "random φ(1,1)"), rows)


def memory_table(a: RankAnalysis) -> str:
    m = a.memory
    if m is None:
        return ""
    gib = [f"{b / 2**30:,.3f} GiB" for b in m.peak_bytes]
    rows = [(f"r = {r}", f"{p:,}", g) for r, p, g in zip((a.r1, a.r2, a.recommended_r), m.trainable_params, gib)]
    note = (f"<p class='note'>{esc(m.model)}, {esc(m.plan.method)}, b = {m.plan.batch_size}, s = {m.plan.seq_len}:"
            f" r = {a.recommended_r} saves {m.saved_bytes / 2**20:,.1f} MiB of peak memory and "
            f"{m.saved_params:,} parameters against r = {a.r2}.</p>")
    return "<h2>Memory (peftplan estimate)</h2>" + table(("rank", "trainable parameters", "peak memory"), rows) + note


def render_rank_html(a: RankAnalysis, plotly_js: str | None = None) -> str:
    """The whole page. `plotly_js` defaults to the bundle shipped with the plotly package."""
    if plotly_js is None:
        from plotly.offline import get_plotlyjs

        plotly_js = get_plotlyjs()
    plot = Plots()
    sections = []
    for kind in a.kinds:
        ms = [m for m in a.modules if m.kind == kind.kind]
        sections.append(f"<h2>{esc(kind.name)}</h2><div class='grid'>"
                        f"<div class='card'>{plot(heatmap_spec(kind, ms, a.r1, a.r2))}</div>"
                        f"<div class='card'>{plot(diagonal_spec(kind, ms, a.threshold))}</div></div>")
    notes = "".join(f"<p class='warn'>{esc(n)}</p>" for n in a.notes)
    head = (f"<h1>peftplan rank: r = {a.r1} against r = {a.r2}</h1>"
            f"<p class='note'>{esc(a.adapter_1)} · {esc(a.adapter_2)} · base model {esc(a.base_model or 'unknown')}"
            f"</p><p>Normalized subspace similarity φ(i, j) = ‖U_i<sup>⊤</sup>V_j‖²<sub>F</sub> / min(i, j) of the "
            f"right-singular vectors of the A matrices (Hu et al. 2021, §7.2). Recommended r = "
            f"<b>{a.recommended_r}</b> (threshold φ(i, i) &gt; {a.threshold:g} in more than half of the layers).</p>")
    body = head + notes + summary_table(a) + memory_table(a) + "".join(sections)
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>peftplan rank</title>"
            f"<style>{CSS}</style><script>{plotly_js}</script></head>\n<body><main>{body}</main></body></html>\n")
