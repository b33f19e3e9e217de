"""Helpers shared by the data-cleaning tests (a plain module: conftest.py names clash across folders)."""
from __future__ import annotations

import json
from pathlib import Path

import zstandard

from llmkit.data.pipeline import load_config

CFG = {**load_config(None), "docs_per_shard": 40}


def read_out(out: Path) -> list[dict]:
    recs = []
    for p in sorted((out / "data").glob("*.jsonl.zst")):
        recs += [json.loads(x) for x in zstandard.decompress(p.read_bytes()).decode().splitlines()]
    return recs


def data_bytes(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted((out / "data").glob("*.jsonl.zst"))}
