"""Model-based quality: a hashed n-gram classifier and an n-gram LM perplexity filter (survey §4.1.2).

Implements:
- `HashedNGramClassifier`: fastText-style features (hashed word unigrams + bigrams, 2^18 buckets,
  L2-normalised counts) and logistic regression trained by full-batch Adam in numpy from positive
  (curated) and negative (random web) samples; saved as .npz (no pickle);
- `QualityClassifier` stage: stores `quality_score` = P(positive) and keeps documents above
  `threshold` (the survey's caveat: it can drop dialectal/colloquial text, hence tag mode);
- `NGramLM`: a hashed word bigram LM with interpolated Kneser-Ney smoothing (discount 0.75,
  continuation unigram with add-one over the hash space), the small-LM stand-in for CCNet's
  KenLM 5-gram; `perplexity(text)`;
- `Perplexity` stage: CCNet-style head/middle/tail buckets from the 30th/60th percentile cut-offs
  (cc_net `PerplexityBucket` defaults) measured on a sample, plus an optional hard `max_perplexity`.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import xxhash

from .document import WORD_RE
from .stage import Stage

N_FEATURES = 1 << 18


def _word_ids(text: str) -> np.ndarray:
    return np.fromiter((xxhash.xxh64_intdigest(w.encode()) for w in WORD_RE.findall(text.lower())), np.uint64)


def features(text: str, n_features: int = N_FEATURES) -> tuple[np.ndarray, np.ndarray]:
    """(bucket indices, L2-normalised counts) of hashed unigrams and bigrams."""
    w = _word_ids(text)
    grams = np.concatenate([w, w[:-1] * np.uint64(0x9E3779B97F4A7C15) + w[1:]]) if len(w) else w
    idx, cnt = np.unique((grams % np.uint64(n_features)).astype(np.int64), return_counts=True)
    val = cnt.astype(np.float64)
    return idx, val / max(np.linalg.norm(val), 1e-12)


class HashedNGramClassifier:
    def __init__(self, n_features: int = N_FEATURES):
        self.n_features = n_features
        self.w = np.zeros(n_features)
        self.b = 0.0

    def _batch(self, texts):
        feats = [features(t, self.n_features) for t in texts]
        rows = np.repeat(np.arange(len(feats)), [len(f[0]) for f in feats])
        return rows, np.concatenate([f[0] for f in feats]), np.concatenate([f[1] for f in feats])

    def fit(self, pos: list[str], neg: list[str], epochs: int = 200, lr: float = 0.1, l2: float = 1e-4, seed: int = 0):
        texts, y = pos + neg, np.array([1.0] * len(pos) + [0.0] * len(neg))
        rows, cols, vals = self._batch(texts)
        n = len(texts)
        m = np.zeros(self.n_features + 1)
        v = np.zeros(self.n_features + 1)
        for t in range(1, epochs + 1):  # full-batch Adam: deterministic, no sampling
            p = self._sigmoid(np.bincount(rows, self.w[cols] * vals, n) + self.b)
            err = (p - y) / n
            g = np.append(np.bincount(cols, err[rows] * vals, self.n_features) + l2 * self.w, err.sum())
            m = 0.9 * m + 0.1 * g
            v = 0.999 * v + 0.001 * g * g
            step = lr * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
            self.w -= step[:-1]
            self.b -= step[-1]
        return self

    @staticmethod
    def _sigmoid(z):
        return 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        rows, cols, vals = self._batch(texts)
        return self._sigmoid(np.bincount(rows, self.w[cols] * vals, len(texts)) + self.b)

    def save(self, path: str | Path) -> None:
        np.savez_compressed(path, w=self.w, b=np.array([self.b]), n_features=np.array([self.n_features]))

    @classmethod
    def load(cls, path: str | Path) -> "HashedNGramClassifier":
        with np.load(path, allow_pickle=False) as z:
            clf = cls(int(z["n_features"][0]))
            clf.w, clf.b = z["w"], float(z["b"][0])
        return clf


class QualityClassifier(Stage):
    """Hashed n-gram logistic-regression quality score; keeps score >= threshold."""

    type = "quality_classifier"
    histogram_keys = ("quality_score",)

    def __init__(self, model: str | None = None, threshold: float = 0.5, **kw):
        super().__init__(**kw)
        if not model or not Path(model).exists():
            raise FileNotFoundError(f"quality_classifier: model file {model!r} not found; train one with "
                                    "`llmkit data train-quality --positive P --negative N -o model.npz`")
        self.clf, self.threshold = HashedNGramClassifier.load(model), threshold

    def measure(self, doc):
        score = float(self.clf.predict_proba([doc.text])[0])
        doc.metadata["quality_score"] = round(score, 4)
        return {"quality_score": score}

    def judge(self, s):
        return "quality_low_score" if s["quality_score"] < self.threshold else None


class NGramLM:
    """Hashed word bigram LM, interpolated Kneser-Ney (Chen & Goodman 1998, one discount)."""

    BOS = np.uint64(0x5EED5EED5EED5EED)

    def __init__(self, discount: float = 0.75, vocab_buckets: int = 1 << 20):
        self.d, self.V = discount, vocab_buckets
        self.cutoffs: tuple[float, float] | None = None

    def _seq(self, text):
        return np.concatenate([[self.BOS], _word_ids(text) % np.uint64(self.V)])

    def fit(self, texts: list[str]) -> "NGramLM":
        seqs = [self._seq(t) for t in texts]
        ctx = np.concatenate([s[:-1] for s in seqs])
        nxt = np.concatenate([s[1:] for s in seqs])
        big, counts = np.unique(ctx * np.uint64(self.V) + nxt, return_counts=True)
        self.big_keys, self.big_counts = big, counts
        bctx, bnxt = big // np.uint64(self.V), big % np.uint64(self.V)
        self.ctx_keys, ctx_idx = np.unique(bctx, return_inverse=True)
        self.ctx_counts = np.bincount(ctx_idx, counts)       # c(v)
        self.ctx_types = np.bincount(ctx_idx)                # N1+(v, .)
        self.cont_keys, cont_idx = np.unique(bnxt, return_inverse=True)
        self.cont_counts = np.bincount(cont_idx)             # N1+(., w)
        self.n_bigram_types = len(big)
        return self

    @staticmethod
    def _lookup(keys, values, q, default=0.0):
        pos = np.searchsorted(keys, q).clip(max=max(len(keys) - 1, 0))
        found = keys[pos] == q if len(keys) else np.zeros(len(q), bool)
        return np.where(found, values[pos] if len(keys) else 0, default)

    def log_probs(self, text: str) -> np.ndarray:
        s = self._seq(text)
        v, w = s[:-1], s[1:]
        pcont = (self._lookup(self.cont_keys, self.cont_counts, w) + 1.0) / (self.n_bigram_types + self.V)
        cv = self._lookup(self.ctx_keys, self.ctx_counts, v)
        tv = self._lookup(self.ctx_keys, self.ctx_types, v)
        cvw = self._lookup(self.big_keys, self.big_counts, v * np.uint64(self.V) + w)
        safe = np.maximum(cv, 1.0)
        p = np.where(cv > 0, np.maximum(cvw - self.d, 0) / safe + self.d * tv / safe * pcont, pcont)
        return np.log(p)

    def perplexity(self, text: str) -> float:
        lp = self.log_probs(text)
        return float(math.exp(-lp.mean())) if len(lp) else float("inf")

    def fit_cutoffs(self, texts: list[str], head: float = 30, tail: float = 60) -> tuple[float, float]:
        pp = [self.perplexity(t) for t in texts]
        self.cutoffs = (float(np.percentile(pp, head)), float(np.percentile(pp, tail)))
        return self.cutoffs

    def bucket(self, ppl: float) -> str:
        if self.cutoffs is None:
            raise ValueError("NGramLM has no bucket cut-offs; call fit_cutoffs(sample) or give `cutoffs`")
        return "head" if ppl < self.cutoffs[0] else "middle" if ppl < self.cutoffs[1] else "tail"

    def save(self, path) -> None:
        np.savez_compressed(path, big_keys=self.big_keys, big_counts=self.big_counts, ctx_keys=self.ctx_keys,
                            ctx_counts=self.ctx_counts, ctx_types=self.ctx_types, cont_keys=self.cont_keys,
                            cont_counts=self.cont_counts,
                            meta=np.array([self.d, self.V, self.n_bigram_types], np.float64),
                            cutoffs=np.array(self.cutoffs if self.cutoffs else [np.nan, np.nan]))

    @classmethod
    def load(cls, path) -> "NGramLM":
        with np.load(path, allow_pickle=False) as z:
            lm = cls(float(z["meta"][0]), int(z["meta"][1]))
            for k in ("big_keys", "big_counts", "ctx_keys", "ctx_counts", "ctx_types", "cont_keys", "cont_counts"):
                setattr(lm, k, z[k])
            lm.n_bigram_types = int(z["meta"][2])
            c = z["cutoffs"]
            lm.cutoffs = None if np.isnan(c).any() else (float(c[0]), float(c[1]))
        return lm


class Perplexity(Stage):
    """n-gram LM perplexity with CCNet head/middle/tail buckets; drop buckets or above max_perplexity."""

    type = "perplexity"
    histogram_keys = ("perplexity",)

    def __init__(self, model: str | None = None, cutoffs: list[float] | None = None,
                 drop_buckets: list[str] = (), max_perplexity: float | None = None, **kw):
        super().__init__(**kw)
        if not model or not Path(model).exists():
            raise FileNotFoundError(f"perplexity: LM file {model!r} not found; train one with "
                                    "`llmkit data train-lm --text REFERENCE... -o lm.npz`")
        self.lm = NGramLM.load(model)
        if cutoffs:
            self.lm.cutoffs = (float(cutoffs[0]), float(cutoffs[1]))
        self.drop_buckets, self.max_ppl = set(drop_buckets), max_perplexity

    def measure(self, doc):
        ppl = self.lm.perplexity(doc.text)
        bucket = self.lm.bucket(ppl) if self.lm.cutoffs else None
        doc.metadata["perplexity"] = round(ppl, 2)
        if bucket:
            doc.metadata["ppl_bucket"] = bucket
        return {"perplexity": ppl, "bucket": bucket}

    def judge(self, s):
        if self.max_ppl is not None and s["perplexity"] > self.max_ppl:
            return "perplexity_too_high"
        if s["bucket"] in self.drop_buckets:
            return f"perplexity_{s['bucket']}"
        return None
