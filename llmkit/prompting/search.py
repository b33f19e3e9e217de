"""Prompt optimisation, automatic demonstrations and test-time scaling (survey §6.1.2, §6.2.2, §9.8).

Implements:
- `optimize_prompt(seed_prompts, scorer, budget)`: discrete, edit-based search (GrIPS-style edit operators:
  delete / swap / duplicate-from-pool phrases, plus an optional LLM paraphraser as in APE/OPRO) as a beam
  search; the scorer is pluggable (dev-set accuracy of a model, or any function), every candidate is scored
  once (memoised), and the search stops after `budget` scorer calls;
- `auto_cot(questions, k, embed, zero_shot)`: Auto-CoT (Zhang et al. 2023) — k-means over question
  embeddings, then per cluster the question nearest its centre gets a zero-shot-CoT rationale as its demo;
- `best_of_n(lm, prompt, n, verifier)`: sample n candidates, keep the one the verifier scores highest (ties:
  the earliest sample), e.g. with a verifiable reward;
- verifiable rewards: `numeric_reward` (exact numeric match of the extracted answer), `unit_test_reward`
  (a program passes its tests in the sandbox).
"""
from __future__ import annotations

import random
import re
from typing import Callable, Sequence

import numpy as np

from llmkit.eval.metrics import answers_match, extract_number

from .sandbox import run_python


# --------------------------------------------------------------------------- prompt optimisation
def phrases(prompt: str) -> list[str]:
    return [p for p in re.split(r"(?<=[.!?;,])\s+", prompt.strip()) if p]


def edits(prompt: str, pool: Sequence[str], rng: random.Random, n: int) -> list[str]:
    """n edited neighbours: delete a phrase, swap two, or insert a phrase from the pool."""
    ps = phrases(prompt)
    out = []
    for _ in range(n):
        q = list(ps)
        op = rng.choice(["delete", "swap", "add"] if len(q) > 1 else ["add"])
        if op == "delete":
            q.pop(rng.randrange(len(q)))
        elif op == "swap":
            i, j = rng.sample(range(len(q)), 2)
            q[i], q[j] = q[j], q[i]
        elif pool:
            q.insert(rng.randrange(len(q) + 1), rng.choice(list(pool)))
        out.append(" ".join(q))
    return out


def optimize_prompt(seeds: Sequence[str], scorer: Callable[[str], float], *, budget: int = 100, beam: int = 4,
                    per_step: int = 8, pool: Sequence[str] = (), paraphrase: Callable[[str], list[str]] | None = None,
                    seed: int = 0) -> tuple[str, float, list[tuple[str, float]]]:
    """Best prompt, its score and the scored history (in order of evaluation)."""
    rng = random.Random(seed)
    cache: dict[str, float] = {}
    history: list[tuple[str, float]] = []

    def score(p: str) -> float | None:
        if p in cache:
            return cache[p]
        if len(cache) >= budget:
            return None
        cache[p] = float(scorer(p))
        history.append((p, cache[p]))
        return cache[p]

    frontier = [p for p in dict.fromkeys(seeds) if score(p) is not None]
    while len(cache) < budget:
        cands = []
        for p in frontier:
            cands += edits(p, pool, rng, per_step)
            if paraphrase:
                cands += paraphrase(p)
        fresh = [c for c in dict.fromkeys(cands) if c and c not in cache]
        if not fresh:
            break
        for c in fresh:
            if score(c) is None:
                break
        frontier = sorted(cache, key=lambda p: -cache[p])[:beam]
    best = max(cache, key=lambda p: cache[p])
    return best, cache[best], history


# --------------------------------------------------------------------------- Auto-CoT
def kmeans(x: np.ndarray, k: int, iters: int = 50, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ seeding; returns (labels, centres)."""
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d = np.min([((x - c) ** 2).sum(1) for c in centres], axis=0)
        centres.append(x[rng.choice(len(x), p=d / d.sum())] if d.sum() > 0 else x[rng.integers(len(x))])
    c = np.stack(centres)
    for _ in range(iters):
        labels = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
        new = np.stack([x[labels == j].mean(0) if (labels == j).any() else c[j] for j in range(k)])
        if np.allclose(new, c):
            break
        c = new
    return labels, c


def auto_cot(questions: Sequence[str], k: int, embed: Callable[[Sequence[str]], np.ndarray],
             zero_shot: Callable[[list[str]], list[str]] | None = None, seed: int = 0) -> list[dict]:
    """One demo per cluster: the question nearest its cluster centre, with a zero-shot-CoT rationale."""
    x = np.asarray(embed(list(questions)))
    labels, centres = kmeans(x, k, seed=seed)
    picks = []
    for j in range(k):
        idx = np.flatnonzero(labels == j)
        if len(idx):
            picks.append(int(idx[((x[idx] - centres[j]) ** 2).sum(1).argmin()]))
    qs = [questions[i] for i in picks]
    rationales = zero_shot(qs) if zero_shot else [""] * len(qs)
    return [{"index": i, "question": q, "rationale": r} for i, q, r in zip(picks, qs, rationales)]


# --------------------------------------------------------------------------- test-time scaling
def best_of_n(lm, prompt: str, n: int, verifier: Callable[[str], float], *, temperature: float = 0.8,
              max_new_tokens: int = 128, stop=None, seed: int = 0) -> tuple[str, float, list[str]]:
    samples = [lm.generate([prompt], max_new_tokens=max_new_tokens, temperature=temperature, stop=stop,
                           seed=seed + j)[0] for j in range(n)]
    scores = [verifier(s) for s in samples]
    j = int(np.argmax(scores))  # first maximum: ties go to the earliest sample
    return samples[j], scores[j], samples


def numeric_reward(gold: str, extract: Callable[[str], str | None] = extract_number) -> Callable[[str], float]:
    return lambda text: float(answers_match(extract(text), gold))


def unit_test_reward(tests: str, timeout: float = 5.0) -> Callable[[str], float]:
    return lambda program: float(run_python(program + "\n\n" + tests, timeout=timeout).ok)
