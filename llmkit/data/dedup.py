"""De-duplication stages (survey §4.1.2: sentence-, document- and set-level de-duplication).

Implements, as `GlobalStage`s (keys computed by parallel workers, one decision in global order, so
the first occurrence in input order is always the one kept, whatever the number of workers):
- `ExactDedup`: xxh64 of the CCNet-normalised text (or raw text with `normalize: false`);
- `LineDedup`: CCNet-style paragraph/line dedup: a line (or blank-line paragraph) whose normalised
  hash occurred earlier is removed; a document left with fewer than `min_chars` is dropped;
- `SentenceSpanDedup`: C4's "discard all but one of any three-sentence span occurring more than
  once"; a document left with fewer than `n_sentences` sentences is dropped (datatrove's rule);
- `MinHashDedup`: near-duplicates by MinHash-LSH (`minhash.py`), one kept per union-find cluster.
"""
from __future__ import annotations

import numpy as np
import xxhash

from .document import SENT_RE, normalize_for_dedup
from .minhash import Shingler, near_duplicates, signatures
from .stage import GlobalStage


def _h64(s: str) -> int:
    return xxhash.xxh64_intdigest(s.encode("utf-8"))


def first_occurrence_mask(hashes: np.ndarray) -> np.ndarray:
    """True where a hash appears for the first time (in array order)."""
    first = np.zeros(len(hashes), bool)
    if len(hashes):
        _, idx = np.unique(hashes, return_index=True)
        first[idx] = True
    return first


class ExactDedup(GlobalStage):
    """Exact dedup on the CCNet-normalised text hash; the first occurrence is kept."""

    type = "exact_dedup"

    def __init__(self, normalize: bool = True, **kw):
        super().__init__(**kw)
        self.normalize = normalize

    def keys(self, doc):
        return np.array([_h64(normalize_for_dedup(doc.text) if self.normalize else doc.text)], np.uint64)

    def decide(self, keys):
        first = first_occurrence_mask(np.concatenate(keys) if keys else np.zeros(0, np.uint64))
        return [None if f else "exact_duplicate" for f in first]


def _ragged_first(keys: list[np.ndarray]) -> list[np.ndarray]:
    """Per document, indices of its units whose hash occurred earlier (globally, in order)."""
    lens = np.fromiter((len(k) for k in keys), np.int64, len(keys))
    flat = np.concatenate(keys) if len(keys) and lens.sum() else np.zeros(0, np.uint64)
    dup = ~first_occurrence_mask(flat)
    bounds = np.concatenate([[0], np.cumsum(lens)])
    return [np.nonzero(dup[bounds[i]: bounds[i + 1]])[0] for i in range(len(keys))]


class LineDedup(GlobalStage):
    """CCNet line/paragraph dedup: removes units seen earlier; drops docs left empty."""

    type = "line_dedup"

    def __init__(self, unit: str = "line", min_chars: int = 1, min_unit_chars: int = 0, **kw):
        super().__init__(**kw)
        if unit not in ("line", "paragraph"):
            raise ValueError(f"line_dedup: unit must be 'line' or 'paragraph', not {unit!r}")
        self.sep = "\n" if unit == "line" else "\n\n"
        self.min_chars, self.min_unit_chars = min_chars, min_unit_chars

    def _units(self, text):
        return text.split(self.sep)

    def keys(self, doc):
        # empty/short units get a per-position hash that never collides, so they are never "duplicates"
        out = []
        for i, u in enumerate(self._units(doc.text)):
            norm = normalize_for_dedup(u)
            out.append(_h64(norm) if len(norm) > max(self.min_unit_chars, 0) else _h64(f"\x00{doc.id}\x00{i}"))
        return np.array(out, np.uint64)

    def decide(self, keys):
        return [d if len(d) else None for d in _ragged_first(keys)]

    def apply_decision(self, doc, decision):
        if decision is None:
            return None
        drop = set(int(i) for i in decision)
        units = self._units(doc.text)
        self.stats.count("units_removed", len(drop))
        doc.text = self.sep.join(u for i, u in enumerate(units) if i not in drop)
        return "line_dedup_empty" if len(doc.text.strip()) < self.min_chars else None


class SentenceSpanDedup(GlobalStage):
    """C4 3-sentence-span dedup: each span kept at its first occurrence only."""

    type = "sentence_dedup"

    def __init__(self, n_sentences: int = 3, **kw):
        super().__init__(**kw)
        self.n = n_sentences

    def _spans(self, text):
        return [(m.start(), m.end(), m.group().strip()) for m in SENT_RE.finditer(text) if m.group().strip()]

    def keys(self, doc):
        sents = [normalize_for_dedup(s) for _, _, s in self._spans(doc.text)]
        return np.array([_h64("\x01".join(sents[i: i + self.n])) for i in range(len(sents) - self.n + 1)], np.uint64)

    def decide(self, keys):
        return [d if len(d) else None for d in _ragged_first(keys)]

    def apply_decision(self, doc, decision):
        if decision is None:
            return None
        spans = self._spans(doc.text)
        drop = set()
        for i in decision:
            drop.update(range(int(i), int(i) + self.n))
        self.stats.count("sentences_removed", len(drop))
        parts, prev = [], 0
        for j, (start, end, _) in enumerate(spans):
            if j in drop:
                parts.append(doc.text[prev:start])
                prev = end
        parts.append(doc.text[prev:])
        doc.text = "".join(parts).strip()
        return "sentence_dedup_too_short" if len(spans) - len(drop) < self.n else None


class MinHashDedup(GlobalStage):
    """MinHash-LSH near-dedup (5-gram, 14x8 by default), one kept per union-find cluster."""

    type = "minhash_dedup"

    def __init__(self, ngram: int = 5, bands: int = 14, rows: int = 8, seed: int = 1, **kw):
        super().__init__(**kw)
        self.ngram, self.bands, self.rows, self.seed = ngram, bands, rows, seed
        self.shingler = Shingler(ngram)

    def keys_batch(self, docs):
        sigs = signatures([self.shingler(d.text) for d in docs], self.bands * self.rows, self.seed)
        return list(sigs)

    def keys(self, doc):
        return self.keys_batch([doc])[0]

    def decide(self, keys):
        if not keys:
            return []
        dup = near_duplicates(np.stack(keys), self.bands, self.rows)
        return ["minhash_near_duplicate" if d else None for d in dup]
