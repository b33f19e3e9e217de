"""report.html for a cleaning run: removal funnel, score histograms, removed examples (survey §4.1.4).

Self-contained HTML with inline SVG (no JavaScript, no network, no plotting dependency):
- the funnel: documents in/out per stage, bar widths relative to the input, reasons per stage;
- a histogram of every score a stage recorded (language score, word counts, perplexity, ...);
- a few removed documents per reason, so a reviewer can see *what* a rule throws away.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from ..artifacts import atomic_write_text

CSS = """body{font:14px system-ui,sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}
td,th{padding:3px 8px;border-bottom:1px solid #ddd;text-align:left}.bar{fill:#4a7}.rm{fill:#c55}
pre{white-space:pre-wrap;background:#f6f6f6;padding:6px;max-height:8em;overflow:auto}h3{margin-top:1.5em}"""


def _funnel(stats: dict) -> str:
    first = next(iter(stats.values()), {"in": 0})
    total = max(first["in"], 1)
    rows = []
    for name, s in stats.items():
        w_out = 300 * s["out"] / total
        w_rm = 300 * (s["in"] - s["out"]) / total
        bar = (f'<svg width="310" height="14"><rect class="bar" width="{w_out:.1f}" height="14"/>'
               f'<rect class="rm" x="{w_out:.1f}" width="{w_rm:.1f}" height="14"/></svg>')
        reasons = ", ".join(f"{html.escape(r)}: {n}" for r, n in sorted(s["removed"].items(), key=lambda kv: -kv[1]))
        counters = ", ".join(f"{html.escape(r)}: {n}" for r, n in s.get("counters", {}).items())
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{s['in']}</td><td>{s['out']}</td><td>{bar}</td>"
                    f"<td>{reasons}</td><td>{counters}</td></tr>")
    return ("<table><tr><th>stage</th><th>in</th><th>out</th><th>kept / removed</th><th>removed by reason</th>"
            "<th>edits</th></tr>" + "".join(rows) + "</table>")


def svg_histogram(values: list[float], bins: int = 30, width: int = 360, height: int = 120) -> str:
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return ""
    counts, edges = np.histogram(v, bins=bins)
    bw = width / bins
    top = max(counts.max(), 1)
    bars = "".join(f'<rect class="bar" x="{i * bw:.1f}" y="{height - height * c / top:.1f}" width="{bw - 1:.1f}" '
                   f'height="{height * c / top:.1f}"><title>{edges[i]:.3g}..{edges[i + 1]:.3g}: {c}</title></rect>'
                   for i, c in enumerate(counts))
    return (f'<svg width="{width}" height="{height + 16}">{bars}<text y="{height + 13}" font-size="11">{edges[0]:.3g}</text>'
            f'<text x="{width}" y="{height + 13}" font-size="11" text-anchor="end">{edges[-1]:.3g}</text></svg>')


def render(stats: dict, config: dict) -> str:
    parts = [f"<!doctype html><meta charset=utf-8><title>llmkit data clean report</title><style>{CSS}</style>",
             "<h1>Cleaning report</h1><h2>Removal funnel</h2>", _funnel(stats), "<h2>Score histograms</h2>"]
    for name, s in stats.items():
        for key, vals in s.get("scores", {}).items():
            parts.append(f"<h3>{html.escape(name)} · {html.escape(key)} (n={len(vals)})</h3>{svg_histogram(vals)}")
    parts.append("<h2>Examples of removed documents</h2>")
    for name, s in stats.items():
        for reason, exs in s.get("examples", {}).items():
            parts.append(f"<h3>{html.escape(name)} · {html.escape(reason)}</h3>")
            parts += [f"<p><b>{html.escape(str(e['id']))}</b></p><pre>{html.escape(e['text'])}</pre>" for e in exs]
    parts.append(f"<h2>Config</h2><pre>{html.escape(json.dumps(config, indent=2, default=str))}</pre>")
    return "\n".join(parts)


def write_report(path: str | Path, stats: dict, config: dict) -> None:
    atomic_write_text(path, render(stats, config))
