"""The HTML capacity report: compute every figure's data (`data`), then render one self-contained page (`html`).

    from peftplan.report import build_report
    page = build_report(["opt-6.7b"], ["t4", "a100-40gb"], seq_len=512, tokens=10**8)

Names load on first use: the CLI imports `peftplan.report.cli` on every start, and that must stay cheap.
"""
from __future__ import annotations

_NAMES = {"ReportData": "data", "report_data": "data", "build_report": "html", "render_html": "html"}
__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        import importlib

        return getattr(importlib.import_module(f"peftplan.report.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'peftplan.report' has no attribute '{name}'")
