"""Tag, then filter (dolma's attributes idea, survey §4.1.2): re-judge stored scores with new thresholds.

A `mode: tag` run keeps every document and stores each stage's scores in `metadata.attrs[stage]`.
`refilter_dir` reads such a run's shards, asks every stage of a (new) config to judge the stored
scores -- no language ID, model or n-gram statistic is recomputed -- and writes the kept documents
with the same shard layout, stats.json and a manifest naming the tagged run as parent. The `attrs`
are kept, so thresholds can be changed again.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..artifacts import atomic_write_json, write_manifest
from .pipeline import build_stages, refilter
from .readers import read_any
from .runner import _encode, write_validated


def refilter_dir(src: str | Path, out: str | Path, config: dict, command: list[str] | None = None) -> dict:
    src, out = Path(src), Path(out)
    shards = sorted((src / "data").glob("*.jsonl.zst"))
    if not shards:
        raise FileNotFoundError(f"{src}/data has no *.jsonl.zst shards; is it a `llmkit data clean --mode tag` output?")
    stages = build_stages({**config, "mode": "filter"})
    stats = {"in": 0, "out": 0, "removed": {}}
    for shard in shards:
        kept = []
        for doc in read_any(str(shard), "jsonl"):
            stats["in"] += 1
            reason = refilter(doc, stages)
            if reason is None:
                kept.append(doc)
            else:
                stats["removed"][reason] = stats["removed"].get(reason, 0) + 1
        stats["out"] += len(kept)
        if kept:
            write_validated(out / "data" / shard.name, _encode(kept), len(kept))
    atomic_write_json(out / "stats.json", {"refilter": stats})
    write_manifest(out, "dataset", parents=[src], config=config, command=command,
                   extra={"derived_by": "tag-then-filter", "source_config": json.loads((src / "config.json").read_text())
                          if (src / "config.json").exists() else None})
    return stats
