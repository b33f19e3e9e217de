"""Evaluation artifacts (survey §7): results.json, samples.jsonl, a markdown/HTML report, the scaling plot.

Implements:
- `write_run(out_dir, results, samples)`: atomic writes of results.json (per task: metric, value, stderr, n, all
  metrics), samples.jsonl (prompt, prediction, target, score per item), report.md, report.html, manifest.json;
- `table(results_by_model)`: one markdown table, tasks as rows and models as columns (value ± stderr);
- `plot_scaling(results_by_model, out)`: accuracy against parameters (and training compute when known), one
  line per task — the "emergent abilities" view of Wei et al. (2022), survey §2.1 / Fig. 3.
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path

from ..artifacts import atomic_write_text


def _fmt(v, se=None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    s = f"{v:.4f}" if abs(v) < 100 else f"{v:.4g}"
    if se is not None and not (isinstance(se, float) and math.isnan(se)):
        s += f" ± {se:.4f}"
    return s


def rows(results: dict) -> list[tuple[str, str, float, float, int]]:
    out = [(t, r["metric"], r["value"], r["stderr"], r["n"]) for t, r in results["results"].items()]
    out += [(g + " (micro)", r["metric"], r["value"], r["stderr"], r["n"]) for g, r in results.get("groups", {}).items()]
    out += [(g + " (macro)", "acc", r["acc_macro"], float("nan"), r["n"]) for g, r in results.get("groups", {}).items()]
    return out


def markdown(results: dict) -> str:
    m = results.get("model", {})
    lines = [f"# Evaluation: {m.get('name', 'model')}", "",
             f"parameters: {m.get('num_params') or '?'}; config: `{json.dumps(results.get('config', {}))}`", "",
             "| task | metric | value | stderr | n |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {t} | {k} | {_fmt(v)} | {_fmt(s)} | {n} |" for t, k, v, s, n in rows(results)]
    return "\n".join(lines) + "\n"


def html_report(results: dict) -> str:
    body = "".join(f"<tr><td>{html.escape(t)}</td><td>{html.escape(str(k))}</td><td>{_fmt(v)}</td><td>{_fmt(s)}</td>"
                   f"<td>{n}</td></tr>" for t, k, v, s, n in rows(results))
    name = html.escape(str(results.get("model", {}).get("name", "model")))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>llmkit eval: {name}</title><style>"
            "body{font-family:sans-serif;margin:2em}td,th{padding:4px 10px;border-bottom:1px solid #ddd}"
            f"</style></head><body><h1>Evaluation: {name}</h1><table><tr><th>task</th><th>metric</th><th>value</th>"
            f"<th>stderr</th><th>n</th></tr>{body}</table></body></html>\n")


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def write_run(out_dir: str | Path, results: dict, samples: list[dict], command: str | None = None) -> Path:
    from ..artifacts import write_manifest

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=_json_default) + "\n")
    atomic_write_text(out / "samples.jsonl",
                      "".join(json.dumps(s, default=_json_default) + "\n" for s in samples))
    atomic_write_text(out / "report.md", markdown(results))
    atomic_write_text(out / "report.html", html_report(results))
    try:
        write_manifest(out, "eval", config=results.get("config", {}), command=command)
    except TypeError:  # an older artifacts signature: the run itself is complete without the manifest
        pass
    return out


def table(by_model: dict[str, dict]) -> str:
    models = list(by_model)
    tasks: list[tuple[str, str]] = []
    for r in by_model.values():
        for t, k, *_ in rows(r):
            if (t, k) not in tasks:
                tasks.append((t, k))
    lines = ["| task | metric | " + " | ".join(models) + " |", "| --- | --- |" + " --- |" * len(models)]
    for t, k in tasks:
        cells = []
        for mname in models:
            hit = [(v, s) for tt, kk, v, s, _ in rows(by_model[mname]) if (tt, kk) == (t, k)]
            cells.append(_fmt(*hit[0]) if hit else "—")
        lines.append(f"| {t} | {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_scaling(by_model: dict[str, dict], out: str | Path, x: str = "num_params") -> Path | None:
    """Accuracy (primary metric) against parameters, or against `x` = 'compute' (model.train_flops)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "num_params" if x == "num_params" else "train_flops"
    pts = {m: r.get("model", {}).get(key) for m, r in by_model.items()}
    models = [m for m in by_model if pts[m]]
    if len(models) < 2:
        return None
    models.sort(key=lambda m: pts[m])
    fig, ax = plt.subplots(figsize=(6, 4))
    tasks = sorted({t for m in models for t in by_model[m]["results"]})
    for t in tasks:
        xs = [pts[m] for m in models if t in by_model[m]["results"]]
        ys = [by_model[m]["results"][t]["value"] for m in models if t in by_model[m]["results"]]
        ax.plot(xs, ys, marker="o", label=t)
    ax.set_xscale("log")
    ax.set_xlabel("parameters" if key == "num_params" else "training compute (FLOPs)")
    ax.set_ylabel("primary metric")
    ax.set_title("Accuracy vs scale")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
