"""In-context learning (survey §6.2): demonstration selection, ordering, prompt assembly and calibration.

Implements:
- retrievers over a demonstration pool: `random`, `bm25` (Okapi BM25, k1=1.5, b=0.75: the Robertson/Zaragoza
  defaults rank_bm25 uses), embedding `knn` (KATE, Liu et al. 2021; cosine over any embedder, with an offline
  hashed bag-of-n-grams embedder as default and `lm_embedder` = mean final hidden state of a llmkit model),
  and `mmr` (maximal marginal relevance, Carbonell & Goldstein 1998; lambda=0.5 balances relevance/diversity);
- ordering: `similarity` (ascending, so the most similar demo sits next to the query: recency bias, Zhao et al.
  2021), `reverse`, `random`, and `global_entropy` (Lu et al. 2022: pick the permutation whose predicted
  labels on probe inputs are most balanced);
- `build_prompt`: description + demos + query under a token budget; the query is always kept and the demos
  furthest from it (the oldest) are dropped first;
- contextual calibration ("Calibrate Before Use", Zhao et al. 2021): label probabilities for content-free inputs
  ("N/A", "[MASK]", "") give p_cf; predictions use p / p_cf, renormalised (W = diag(p_cf)^-1, b = 0).
"""
from __future__ import annotations

import hashlib
import itertools
import math
import random
import re
from collections import Counter
from typing import Callable, Sequence

import numpy as np

_TOKEN = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


# --------------------------------------------------------------------------- similarity
class BM25:
    def __init__(self, docs: Sequence[str], k1: float = 1.5, b: float = 0.75):
        self.k1, self.b = k1, b
        self.tf = [Counter(words(d)) for d in docs]
        self.len = np.array([sum(t.values()) for t in self.tf], dtype=float)
        self.avg = float(self.len.mean()) if len(docs) else 0.0
        df = Counter(w for t in self.tf for w in t)
        n = len(docs)
        self.idf = {w: math.log((n - f + 0.5) / (f + 0.5) + 1.0) for w, f in df.items()}  # Lucene's non-negative idf

    def scores(self, query: str) -> np.ndarray:
        out = np.zeros(len(self.tf))
        for w in set(words(query)):
            idf = self.idf.get(w)
            if idf is None:
                continue
            f = np.array([t.get(w, 0) for t in self.tf], dtype=float)
            out += idf * f * (self.k1 + 1) / (f + self.k1 * (1 - self.b + self.b * self.len / max(self.avg, 1e-9)))
        return out


def hashed_embedder(dim: int = 1024) -> Callable[[Sequence[str]], np.ndarray]:
    """Unigram+bigram feature hashing (md5, stable across runs), L2-normalised: an offline text embedding."""
    def embed(texts):
        out = np.zeros((len(texts), dim))
        for i, t in enumerate(texts):
            w = words(t)
            for f in w + [a + " " + b for a, b in zip(w, w[1:])]:
                h = int.from_bytes(hashlib.md5(f.encode()).digest()[:8], "little")
                out[i, h % dim] += 1.0 if (h >> 63) & 1 else -1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return embed


def lm_embedder(model, tokenizer, max_len: int = 256) -> Callable[[Sequence[str]], np.ndarray]:
    """Mean of a llmkit model's final hidden states, L2-normalised."""
    import torch

    @torch.inference_mode()
    def embed(texts):
        rows = []
        for t in texts:
            ids = tokenizer.encode(t)[:max_len] or [tokenizer.eos_token_id or 0]
            h = model(torch.tensor([ids], device=model.device), return_hidden=True)[0].float().mean(0)
            rows.append((h / h.norm().clamp_min(1e-12)).cpu().numpy())
        return np.stack(rows)
    return embed


# --------------------------------------------------------------------------- selection
def select(pool: Sequence[str], query: str, k: int, method: str = "random", *, seed: int = 0,
           embed: Callable | None = None, lam: float = 0.5, exclude: int | None = None) -> list[int]:
    """Indices of k demonstrations from `pool` (texts) for `query`, best first; `exclude` drops one index
    (the query itself when the pool is the evaluation set)."""
    cand = [i for i in range(len(pool)) if i != exclude]
    k = min(k, len(cand))
    if k <= 0:
        return []
    if method == "random":
        return random.Random(seed).sample(cand, k)
    if method == "first":
        return cand[:k]
    if method == "bm25":
        s = BM25([pool[i] for i in cand]).scores(query)
        return [cand[j] for j in _top(s, k)]
    emb = embed or hashed_embedder()
    vecs = emb([pool[i] for i in cand] + [query])
    docs, q = vecs[:-1], vecs[-1]
    sim = docs @ q
    if method == "knn":
        return [cand[j] for j in _top(sim, k)]
    if method == "mmr":
        return [cand[j] for j in mmr(sim, docs @ docs.T, k, lam)]
    raise ValueError(f"unknown selection method {method!r}; use random, first, bm25, knn or mmr")


def _top(scores: np.ndarray, k: int) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]  # ties: lower index first


def mmr(sim_q: np.ndarray, sim_dd: np.ndarray, k: int, lam: float = 0.5) -> list[int]:
    chosen: list[int] = []
    left = list(range(len(sim_q)))
    while left and len(chosen) < k:
        def gain(i):
            red = max((sim_dd[i, j] for j in chosen), default=0.0)
            return lam * sim_q[i] - (1 - lam) * red
        best = max(left, key=lambda i: (gain(i), -i))
        chosen.append(best)
        left.remove(best)
    return chosen


# --------------------------------------------------------------------------- ordering
def order(idx: Sequence[int], pool: Sequence[str], query: str, method: str = "as_is", *, seed: int = 0,
          embed: Callable | None = None) -> list[int]:
    idx = list(idx)
    if method == "as_is":
        return idx
    if method == "reverse":
        return idx[::-1]
    if method == "random":
        random.Random(seed).shuffle(idx)
        return idx
    if method == "similarity":  # ascending: the most similar demo is last, next to the query
        vecs = (embed or hashed_embedder())([pool[i] for i in idx] + [query])
        sim = vecs[:-1] @ vecs[-1]
        return [idx[j] for j in sorted(range(len(idx)), key=lambda j: (sim[j], -j))]
    raise ValueError(f"unknown ordering {method!r}; use as_is, reverse, random or similarity "
                     "(global_entropy needs a model: order_by_global_entropy)")


def order_by_global_entropy(perms: Sequence[Sequence[int]], label_probs: Callable[[Sequence[int]], np.ndarray]):
    """Lu et al. (2022) GlobalE: label_probs(perm) -> [n_probe, n_labels] probabilities; the permutation whose
    predicted-label histogram has the highest entropy wins (ties: the first)."""
    def ent(perm):
        p = np.asarray(label_probs(perm))
        hist = np.bincount(p.argmax(1), minlength=p.shape[1]) / len(p)
        return float(-(hist[hist > 0] * np.log(hist[hist > 0])).sum())
    scores = [ent(p) for p in perms]
    return list(perms[int(np.argmax(scores))])


def permutations(idx: Sequence[int], limit: int = 24, seed: int = 0) -> list[list[int]]:
    perms = [list(p) for p in itertools.permutations(idx)]
    if len(perms) > limit:
        perms = random.Random(seed).sample(perms, limit)
    return perms


# --------------------------------------------------------------------------- prompt assembly
def build_prompt(demos: Sequence[str], query: str, *, description: str = "", sep: str = "\n\n",
                 max_tokens: int | None = None, count: Callable[[str], int] | None = None) -> str:
    """description + demos (sep-joined) + sep + query; under max_tokens the oldest demos go first."""
    demos = list(demos)
    while True:
        text = description + "".join(d + sep for d in demos) + query
        if max_tokens is None or count is None or count(text) <= max_tokens or not demos:
            return text
        demos.pop(0)


# --------------------------------------------------------------------------- calibration
CONTENT_FREE = ("N/A", "[MASK]", "")


def label_probs(lm, prompts: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """[n_prompts, n_labels] probabilities of each label word after each prompt, renormalised over labels."""
    reqs = [(p, lab) for p in prompts for lab in labels]
    lp = np.array([s for s, _ in lm.loglikelihood(reqs)]).reshape(len(prompts), len(labels))
    p = np.exp(lp - lp.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def content_free_probs(lm, make_prompt: Callable[[str], str], labels: Sequence[str],
                       inputs: Sequence[str] = CONTENT_FREE) -> np.ndarray:
    """p_cf: label distribution averaged over content-free inputs put in the query slot."""
    p = label_probs(lm, [make_prompt(x) for x in inputs], labels).mean(0)
    return p / p.sum()


def calibrate(probs: np.ndarray, p_cf: np.ndarray) -> np.ndarray:
    """Contextual calibration: q = normalise(p / p_cf)."""
    q = np.asarray(probs) / np.asarray(p_cf)
    return q / q.sum(-1, keepdims=True)
