"""`llmkit data ...`: clean (this module), filter (tag-then-filter), train-quality, train-lm; tokenize and
mix are dispatched to llmkit.data.tokenize / llmkit.data.mixture (survey §4.1).

    llmkit data clean INPUT... --output DIR [--config pipeline.yaml] [--workers N] [--set key=value]
    llmkit data clean ... --executor ray [--ray-address ADDR]
    llmkit data filter DIR --config new.yaml --output DIR2     # re-judge a `mode: tag` run, no recompute
    llmkit data train-quality --positive FILE... --negative FILE... -o quality.npz
    llmkit data train-lm --text FILE... -o lm.npz [--cutoff-sample FILE...]
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from .pipeline import STAGES, load_config


def _texts(paths: list[str]) -> list[str]:
    from .readers import expand_inputs, read_any

    out = []
    for p, fmt in expand_inputs(paths):
        out += [d.text for d in read_any(p, fmt, separator="<|endoftext|>") if d is not None and hasattr(d, "text")]
    if not out:
        raise SystemExit(f"no documents found in {paths}")
    return out


def clean_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="llmkit data clean", description="Clean pre-training data: language ID, "
                                 "heuristic and model-based quality filters, PII redaction, dedup, decontamination.")
    ap.add_argument("inputs", nargs="+", help="files or folders (.jsonl[.gz|.zst], .json, .txt, .parquet, .html, "
                    ".warc[.gz], datasets folders, hf:NAME[:SPLIT])")
    ap.add_argument("--output", "-o", required=True, help="output directory (resumes an interrupted run)")
    ap.add_argument("--config", help="pipeline YAML; default: langid(en) + Gopher + C4 + PII + exact/MinHash dedup")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. stages.0.threshold=0.5")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--docs-per-shard", type=int, help="records per shard (the unit of resume)")
    ap.add_argument("--separator", help="split text files into documents at this string, e.g. '<|endoftext|>'")
    ap.add_argument("--code", action="store_true", help="read source files in folders (by extension)")
    ap.add_argument("--mode", choices=("filter", "tag"), help="tag: store scores, drop nothing (then `data filter`)")
    ap.add_argument("--executor", choices=("local", "ray"), default="local")
    ap.add_argument("--ray-address", help="Ray cluster address (default: start a local one)")
    ap.add_argument("--help-stages", action="store_true", help="list stage types and exit")
    if "--help-stages" in argv:
        for name, cls in STAGES.items():
            print(f"{name:20s} {(cls.__doc__ or sys.modules[cls.__module__].__doc__ or '').strip().splitlines()[0]}")
        return 0
    a = ap.parse_args(argv)
    cfg = load_config(a.config, a.set)
    for key, val in (("docs_per_shard", a.docs_per_shard), ("separator", a.separator), ("mode", a.mode)):
        if val is not None:
            cfg[key] = val
    executor = None
    if a.executor == "ray":
        from .ray_runner import RayExecutor

        executor = RayExecutor(address=a.ray_address, workers=a.workers)
    from .runner import clean

    try:
        stats = clean(a.inputs, a.output, cfg, workers=a.workers, executor=executor, code=a.code,
                      command=["llmkit", "data", "clean", *argv])
    finally:
        if executor is not None:
            executor.shutdown()
    print(funnel_text(stats))
    print(f"output: {a.output}/data/*.jsonl.zst, stats.json, report.html, manifest.json")
    return 0


def funnel_text(stats: dict) -> str:
    lines = [f"{'stage':<22}{'in':>9}{'out':>9}  removed"]
    for name, s in stats.items():
        reasons = ", ".join(f"{r}={n}" for r, n in sorted(s["removed"].items(), key=lambda kv: -kv[1])[:6])
        edits = ", ".join(f"{r}={n}" for r, n in s.get("counters", {}).items())
        lines.append(f"{name:<22}{s['in']:>9}{s['out']:>9}  {reasons}" + (f"  [edits: {edits}]" if edits else ""))
    return "\n".join(lines)


def filter_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="llmkit data filter", description="Tag, then filter: apply new thresholds "
                                 "to the scores a `mode: tag` run stored, without recomputing them.")
    ap.add_argument("input", help="output directory of a `llmkit data clean --mode tag` run")
    ap.add_argument("--config", help="pipeline YAML with the new thresholds (same stage names)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--output", "-o", required=True)
    a = ap.parse_args(argv)
    from .tagfilter import refilter_dir

    stats = refilter_dir(a.input, a.output, load_config(a.config, a.set), command=["llmkit", "data", "filter", *argv])
    print(json.dumps(stats, indent=1))
    return 0


def train_quality_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="llmkit data train-quality", description="Train the hashed n-gram quality classifier.")
    ap.add_argument("--positive", nargs="+", required=True, help="curated text (e.g. Wikipedia, books)")
    ap.add_argument("--negative", nargs="+", required=True, help="random web text / boilerplate")
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args(argv)
    from .quality import HashedNGramClassifier

    HashedNGramClassifier().fit(_texts(a.positive), _texts(a.negative), epochs=a.epochs).save(a.output)
    print(f"wrote {a.output}")
    return 0


def train_lm_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="llmkit data train-lm", description="Train the n-gram LM for perplexity buckets.")
    ap.add_argument("--text", nargs="+", required=True, help="reference corpus (CCNet: Wikipedia)")
    ap.add_argument("--cutoff-sample", nargs="*", help="documents whose 30th/60th perplexity percentiles become buckets")
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args(argv)
    from .quality import NGramLM

    lm = NGramLM().fit(_texts(a.text))
    if a.cutoff_sample:
        print("cut-offs (head < p30, tail >= p60):", lm.fit_cutoffs(_texts(a.cutoff_sample)))
    lm.save(a.output)
    print(f"wrote {a.output}")
    return 0


SUB = {"clean": clean_main, "filter": filter_main, "train-quality": train_quality_main, "train-lm": train_lm_main}
DISPATCH = {"tokenize": "llmkit.data.tokenize:main", "mix": "llmkit.data.mixture:main"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd in SUB:
        return SUB[cmd](rest)
    if cmd in DISPATCH:
        mod, fn = DISPATCH[cmd].split(":")
        return int(getattr(importlib.import_module(mod), fn)(rest) or 0)
    print(f"llmkit data: unknown subcommand {cmd!r}; choose from {sorted([*SUB, *DISPATCH])}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
