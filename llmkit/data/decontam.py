"""Benchmark decontamination: n-gram overlap with evaluation sets (survey §4.1.2, set-level de-dup).

Implements:
- `load_eval_texts(path)`: evaluation items from GSM8K-style jsonl (string fields joined), the
  llama.cpp HellaSwag text format (context + gold ending, `.txt[.bz2]`), CSV (MMLU: cells joined)
  and plain text (one item per non-empty line);
- `NGramIndex`: word n-grams (13 by default, GPT-3's decontamination length; datatrove uses 12)
  of the lower-cased, language-aware word split, hashed to 64 bits (32-bit hashes gave chance hits at
  this index size) and kept in a sorted numpy array (membership by `np.searchsorted`); an item shorter than n words is indexed
  whole when it has at least `min_words` words;
- `Decontaminate` stage: counts overlapping n-grams per benchmark, stores them in
  `metadata["contamination"]`, and drops (or, in tag mode, flags) documents with >= `min_hits`.
"""
from __future__ import annotations

import bz2
import csv
import json
from pathlib import Path

import numpy as np

from .document import WORD_RE
from .minhash import Shingler, shingle_hashes
from .stage import Stage


def _open_text(path: Path):
    return bz2.open(path, "rt", encoding="utf-8") if path.suffix == ".bz2" else open(path, encoding="utf-8")


def _hellaswag(lines: list[str]):
    """llama.cpp format: 'label: context', gold index, 4 endings."""
    for i in range(0, len(lines) - 5, 6):
        ctx = lines[i].split(": ", 1)[-1]
        try:
            gold = int(lines[i + 1])
        except ValueError as e:
            raise ValueError(f"HellaSwag text: line {i + 2} should be the gold index, got {lines[i + 1]!r}") from e
        yield f"{ctx} {lines[i + 2 + gold]}"


def load_eval_texts(path: str | Path) -> list[str]:
    path = Path(path)
    name = path.name.lower()
    if ".jsonl" in name:
        out = []
        with _open_text(path) as f:
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    out.append("\n".join(str(v) for v in rec.values() if isinstance(v, (str, list))))
        return out
    if name.endswith(".csv"):
        with _open_text(path) as f:
            return [" ".join(row) for row in csv.reader(f)]
    with _open_text(path) as f:
        lines = [ln.rstrip("\n") for ln in f]
    if "hellaswag" in name:
        return list(_hellaswag(lines))
    return [ln for ln in lines if ln.strip()]


class NGramIndex:
    def __init__(self, n: int = 13, min_words: int = 8):
        self.n, self.min_words = n, min_words
        self.shingler = Shingler(n)
        self.tables: dict[int, dict[str, np.ndarray]] = {}  # gram length -> benchmark -> sorted hashes

    def add(self, benchmark: str, texts: list[str]) -> None:
        by_len: dict[int, list[np.ndarray]] = {}
        for t in texts:
            wh = self.shingler.word_hashes(WORD_RE.findall(t.lower()))
            k = min(self.n, len(wh))
            if k >= self.min_words:
                by_len.setdefault(k, []).append(shingle_hashes(wh, k, bits=64))
        for k, arrs in by_len.items():
            prev = self.tables.setdefault(k, {}).get(benchmark, np.zeros(0, np.uint64))
            self.tables[k][benchmark] = np.unique(np.concatenate([prev, *arrs]))

    def hits(self, text: str) -> dict[str, int]:
        wh = self.shingler.word_hashes(WORD_RE.findall(text.lower()))
        out: dict[str, int] = {}
        for k, tables in self.tables.items():
            if len(wh) < k:
                continue
            grams = shingle_hashes(wh, k, bits=64)
            for bench, table in tables.items():
                pos = np.searchsorted(table, grams).clip(max=len(table) - 1)
                n = int((table[pos] == grams).sum())
                if n:
                    out[bench] = out.get(bench, 0) + n
        return out


class Decontaminate(Stage):
    """Flags/drops documents sharing >= min_hits word 13-grams with evaluation sets."""

    type = "decontaminate"

    def __init__(self, benchmarks: dict[str, str | list[str]] | list[str] | None = None, n: int = 13,
                 min_words: int = 8, min_hits: int = 1, **kw):
        super().__init__(**kw)
        if not benchmarks:
            raise ValueError("decontaminate: give `benchmarks` (name: path, or a list of paths), e.g. "
                             "{gsm8k: data/gsm8k/test.jsonl, hellaswag: data/hellaswag/hellaswag_val_full.txt.bz2}")
        if isinstance(benchmarks, list):
            benchmarks = {Path(p).parent.name or Path(p).stem: p for p in benchmarks}
        self.index = NGramIndex(n, min_words)
        for name, paths in benchmarks.items():
            for p in [paths] if isinstance(paths, str) else paths:
                if not Path(p).exists():
                    raise FileNotFoundError(f"decontaminate: benchmark file {p} ({name}) not found")
                self.index.add(name, load_eval_texts(p))
        self.min_hits = min_hits

    def measure(self, doc):
        hits = self.index.hits(doc.text)
        if hits:
            doc.metadata["contamination"] = hits
        return {"hits": sum(hits.values()), "benchmarks": sorted(hits)}

    def judge(self, s):
        return "contaminated" if s["hits"] >= self.min_hits else None
