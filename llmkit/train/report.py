"""Run report of survey §4.3 (observability): loss curves as PNG and a self-contained HTML page.

Implements `write_report(run_dir)`: reads `metrics.jsonl`, plots train loss (and val loss when
evaluated) against steps and tokens, learning rate and tokens/s, marks roll-backs, and writes
`loss_curve.png` and `report.html` (the PNG inlined as base64, the last samples, the final figures).
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from ..artifacts import atomic_write_text
from .metrics import read_metrics


def plot_losses(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r and "event" not in r]
    val = [r for r in records if "val_loss" in r]
    events = [r for r in records if r.get("event") == "rollback"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss")
    for e in events:
        ax.axvline(e["step"], color="red", ls="--", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title("loss" + (f" ({len(events)} roll-backs)" if events else ""))
    axes[1].plot([r["step"] for r in train], [r.get("lr", 0) for r in train])
    axes[1].set_title("learning rate")
    axes[1].set_xlabel("step")
    axes[2].plot([r["step"] for r in train], [r.get("tokens_per_s", 0) for r in train])
    axes[2].set_title("tokens / s")
    axes[2].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise FileNotFoundError(f"{run_dir}/metrics.jsonl is missing or empty: nothing to report")
    png = run_dir / "loss_curve.png"
    plot_losses(records, png)
    img = base64.b64encode(png.read_bytes()).decode()
    train = [r for r in records if "loss" in r and "event" not in r]
    val = [r for r in records if "val_loss" in r]
    samples = [r for r in records if r.get("sample")]
    events = [r for r in records if "event" in r]
    last = train[-1] if train else {}
    rows = [("steps", last.get("step")), ("final train loss", last.get("loss")),
            ("final val loss", val[-1]["val_loss"] if val else None), ("tokens", last.get("tokens")),
            ("tokens/s (last)", last.get("tokens_per_s")), ("MFU (last)", last.get("mfu")),
            ("wall time (s)", last.get("wall_time")), ("roll-backs", len([e for e in events if e["event"] == "rollback"]))]
    table = "".join(f"<tr><th>{k}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in rows)
    sample_html = "".join(f"<h4>step {s['step']}</h4><pre>{html.escape(str(s['sample']))}</pre>" for s in samples[-3:])
    event_html = "".join(f"<li>{html.escape(json.dumps(e))}</li>" for e in events)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>llmkit run {html.escape(run_dir.name)}</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}th{text-align:left;padding-right:1em}"
            "pre{background:#f4f4f4;padding:.5em;white-space:pre-wrap}</style></head><body>"
            f"<h1>Run {html.escape(run_dir.name)}</h1><table>{table}</table>"
            f"<img src='data:image/png;base64,{img}' style='width:100%'>"
            + (f"<h2>Stability events</h2><ul>{event_html}</ul>" if events else "")
            + (f"<h2>Samples</h2>{sample_html}" if samples else "") + "</body></html>")
    out = run_dir / "report.html"
    atomic_write_text(out, page)
    return out


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)

