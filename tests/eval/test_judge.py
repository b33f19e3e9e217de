"""Pairwise judging: order swapping removes position bias; Elo / Bradley-Terry recover true strengths."""
import random

import pytest

from llmkit.eval import judge as J


def test_swap_and_combine_cancels_a_position_biased_judge():
    # the judge prefers the longer answer, but says "A" (first position) whenever the two are close
    def biased(q, first, second):
        if abs(len(first) - len(second)) <= 2:
            return "A"
        return "A" if len(first) > len(second) else "B"
    assert J.judge_pair(biased, "q", "long answer here", "short") == 1.0
    assert J.judge_pair(biased, "q", "short", "long answer here") == 0.0
    assert J.judge_pair(biased, "q", "abcd", "abce") == 0.5  # position effect -> tie, in both orders
    assert J.judge_pair(biased, "q", "abce", "abcd") == 0.5
    naive = [1.0 if biased("q", a, b) == "A" else 0.0 for a, b in [("abcd", "abce"), ("abce", "abcd")]]
    assert sum(naive) / 2 == 1.0  # unswapped: first position always wins


def test_verdict_parsing_and_prompt():
    assert J.parse_verdict("... [[B]]") == "B" and J.parse_verdict("[[C]]") == "tie" and J.parse_verdict("?") == "tie"
    p = J.judge_prompt("Q?", "ALPHA", "BETA")
    assert "[User Question]\nQ?" in p and p.index("ALPHA") < p.index("BETA")


def _battles(strength, n, seed):
    rng = random.Random(seed)
    names = list(strength)
    out = []
    for _ in range(n):
        a, b = rng.sample(names, 2)
        pa = 1 / (1 + 10 ** ((strength[b] - strength[a]) / 400))
        out.append((a, b, 1.0 if rng.random() < pa else 0.0))
    return out


def test_bradley_terry_recovers_true_strengths():
    true = {"m1": 1200.0, "m2": 1000.0, "m3": 900.0, "m4": 700.0}
    est = J.bradley_terry(_battles(true, 6000, 0))
    centre_t = sum(true.values()) / 4
    centre_e = sum(est.values()) / 4
    for m in true:
        assert est[m] - centre_e == pytest.approx(true[m] - centre_t, abs=30)
    e = J.elo(_battles(true, 6000, 1))
    assert sorted(e, key=e.get) == ["m4", "m3", "m2", "m1"]


def test_win_rate_interval_contains_the_mean():
    m, lo, hi = J.win_rate([1, 1, 0, 0.5, 1, 0, 1, 1, 0.5, 1])
    assert m == pytest.approx(0.7) and lo < m < hi and 0 <= lo and hi <= 1
