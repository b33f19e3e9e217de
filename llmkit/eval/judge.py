"""Model-based and human-style pairwise evaluation (survey §7.3.2): LLM-as-judge, Elo, Bradley-Terry, win rates.

Implements:
- `judge_pair(judge, question, a, b)`: asks a judge twice with the answers in both orders (position-bias
  mitigation, Zheng et al. 2023 MT-Bench) and combines the verdicts: a win only when both orders agree,
  otherwise a tie; `judge` is any callable (question, first, second) -> "A" | "B" | "tie" (an LLM prompt or a
  human label);
- `judge_prompt`: the MT-Bench-style pairwise prompt for an LLM judge, `parse_verdict` for its "[[A]]" output;
- `elo(battles)`: online Elo (K=4, base 10, scale 400, init 1000: the LMSYS Chatbot Arena settings);
- `bradley_terry(battles)`: maximum-likelihood strengths by the MM algorithm (Hunter 2004), ties as half wins,
  scaled to Elo points;
- `win_rate(outcomes)`: win rate of A vs B with ties as half, and a percentile bootstrap 95% interval.
"""
from __future__ import annotations

import math
import random
import re
from collections import defaultdict
from typing import Callable, Sequence

Battle = tuple[str, str, float]  # (model_a, model_b, score of a: 1 win, 0.5 tie, 0 loss)


def judge_prompt(question: str, first: str, second: str) -> str:
    return ("Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants "
            "to the user question displayed below. Avoid any position biases and ensure that the order in which the "
            "responses were presented does not influence your decision. Output your final verdict by strictly "
            'following this format: "[[A]]" if assistant A is better, "[[B]]" if assistant B is better, and "[[C]]" '
            f"for a tie.\n\n[User Question]\n{question}\n\n[The Start of Assistant A's Answer]\n{first}\n"
            f"[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\n{second}\n"
            "[The End of Assistant B's Answer]")


def parse_verdict(text: str) -> str:
    m = re.search(r"\[\[([ABC])\]\]", text)
    return {"A": "A", "B": "B", "C": "tie"}[m.group(1)] if m else "tie"


def llm_judge(lm, max_new_tokens: int = 256) -> Callable[[str, str, str], str]:
    def judge(q, first, second):
        return parse_verdict(lm.generate([judge_prompt(q, first, second)], max_new_tokens=max_new_tokens)[0])
    return judge


def judge_pair(judge: Callable[[str, str, str], str], question: str, a: str, b: str) -> float:
    """Score of `a` against `b` in {1, 0.5, 0} after judging both orders."""
    v1 = judge(question, a, b)  # a shown first
    v2 = judge(question, b, a)  # a shown second
    s1 = {"A": 1.0, "B": 0.0}.get(v1, 0.5)
    s2 = {"A": 0.0, "B": 1.0}.get(v2, 0.5)
    if s1 == s2:
        return s1
    return 0.5  # the orders disagree: a position effect, counted as a tie


def elo(battles: Sequence[Battle], k: float = 4.0, init: float = 1000.0, scale: float = 400.0) -> dict[str, float]:
    r: dict[str, float] = defaultdict(lambda: init)
    for a, b, s in battles:
        ea = 1.0 / (1.0 + 10 ** ((r[b] - r[a]) / scale))
        r[a] += k * (s - ea)
        r[b] += k * ((1 - s) - (1 - ea))
    return dict(r)


def bradley_terry(battles: Sequence[Battle], iters: int = 500, scale: float = 400.0, anchor: float = 1000.0,
                  tol: float = 1e-10) -> dict[str, float]:
    """MM updates p_i <- W_i / sum_j n_ij / (p_i + p_j); returned as anchor + scale*log10(p_i / geomean(p))."""
    models = sorted({m for a, b, _ in battles for m in (a, b)})
    wins = defaultdict(float)
    n = defaultdict(float)
    for a, b, s in battles:
        wins[a] += s
        wins[b] += 1 - s
        n[(a, b)] += 1
        n[(b, a)] += 1
    p = {m: 1.0 for m in models}
    for _ in range(iters):
        new = {}
        for i in models:
            den = sum(n[(i, j)] / (p[i] + p[j]) for j in models if j != i and n[(i, j)])
            new[i] = max(wins[i], 1e-9) / den if den else p[i]
        g = math.exp(sum(math.log(v) for v in new.values()) / len(new))
        new = {m: v / g for m, v in new.items()}
        done = max(abs(new[m] - p[m]) for m in models) < tol
        p = new
        if done:
            break
    return {m: anchor + scale * math.log10(p[m]) for m in models}


def win_rate(scores: Sequence[float], iters: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """(mean score of A, 2.5th, 97.5th bootstrap percentiles)."""
    rng = random.Random(seed)
    xs = list(scores)
    boots = sorted(sum(rng.choice(xs) for _ in xs) / len(xs) for _ in range(iters))
    return sum(xs) / len(xs), boots[int(0.025 * iters)], boots[int(0.975 * iters) - 1]
