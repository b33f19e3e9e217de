"""Prompt search finds a known best prompt; Auto-CoT picks one demo per cluster; best-of-N and rewards."""
import numpy as np
import pytest

from llmkit.eval.lm import LM
from llmkit.prompting import search


def test_edit_search_finds_the_known_best_prompt_within_budget():
    target = {"Think step by step.", "Answer with a number."}
    bad = {"Be creative."}

    def scorer(p):  # a scripted scorer whose optimum is exactly the two target phrases (in any order)
        ph = set(search.phrases(p))
        return len(ph & target) - 2 * len(ph & bad) - 0.1 * len(ph - target)
    best, s, hist = search.optimize_prompt(["Be creative. Solve it."], scorer, budget=80,
                                           pool=["Think step by step.", "Answer with a number.", "Be creative."])
    assert set(search.phrases(best)) == target and s == pytest.approx(2.0)
    assert len(hist) <= 80 and len({p for p, _ in hist}) == len(hist)  # each candidate scored once


def test_auto_cot_picks_one_demo_per_cluster():
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [10, 0], [0, 10]], dtype=float)
    pts = np.concatenate([c + rng.normal(0, 0.5, (5, 2)) for c in centres])
    qs = [f"q{i}" for i in range(len(pts))]
    embed = lambda texts: pts[[int(t[1:]) for t in texts]]  # noqa: E731
    demos = search.auto_cot(qs, 3, embed, zero_shot=lambda q: [f"because {x}" for x in q])
    clusters = sorted(d["index"] // 5 for d in demos)
    assert clusters == [0, 1, 2] and all(d["rationale"] == f"because {d['question']}" for d in demos)
    for d in demos:  # the pick is the member nearest its cluster mean
        c = d["index"] // 5
        members = pts[c * 5:(c + 1) * 5]
        assert d["index"] == c * 5 + int(((members - members.mean(0)) ** 2).sum(1).argmin())


class NoisySolver(LM):
    """Right with probability 0.3 per sample (seeded): best-of-N with a verifier rises with N."""

    def generate(self, prompts, *, max_new_tokens=64, temperature=0.0, top_p=1.0, stop=None, seed=0):
        rng = np.random.default_rng(seed)
        return [f"The answer is {42 if rng.random() < 0.3 else int(rng.integers(0, 40))}." for _ in prompts]


def test_best_of_n_accuracy_rises_with_n():
    reward = search.numeric_reward("42")
    acc = {}
    for n in (1, 4, 16):
        acc[n] = np.mean([search.best_of_n(NoisySolver(), "Q", n, reward, seed=100 * t)[1] for t in range(60)])
    assert acc[1] < acc[4] < acc[16] and acc[16] > 0.9


def test_verifiable_rewards():
    assert search.numeric_reward("18")("so #### 18") == 1.0 and search.numeric_reward("18")("17") == 0.0
    tests = "assert add(2, 3) == 5"
    assert search.unit_test_reward(tests)("def add(a, b):\n    return a + b") == 1.0
    assert search.unit_test_reward(tests)("def add(a, b):\n    return a - b") == 0.0
