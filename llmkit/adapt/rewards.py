"""Verifiable rewards and the generated arithmetic task (survey §5.2.3 rule-based rewards; GRPO / RLVR).

Implements:
- `arithmetic_problems`: seeded problems with worked steps ("4 * 2 = 8. 3 + 8 = 11. The answer is 11."),
  evaluated left to right with * before + and -, exactly as the steps show; answers are integers;
- `extract_answer`: the number after "The answer is", else after "####" (GSM8K), else the last number;
- `numeric_reward`: 1 for an exact numeric answer, plus an optional small format bonus (DeepSeek-R1's
  "accuracy + format" rule reward); `unit_test_reward`: fraction of assert statements a program passes,
  run in the evaluation sandbox (`llmkit.prompting.sandbox`), which isolates but does not make untrusted
  code safe beyond its documented limits;
- `token_reward_fn`: adapts a text reward to the (items, completion token ids) signature of the rollouts.
"""
from __future__ import annotations

import random
import re

NUM = r"-?\d[\d,]*(?:\.\d+)?"


def _solve(terms: list[int], ops: list[str]) -> tuple[int, list[str]]:
    """Multiplications first, then + and - left to right; returns the value and the worked steps."""
    terms, ops, steps = list(terms), list(ops), []
    while "*" in ops:
        i = ops.index("*")
        v = terms[i] * terms[i + 1]
        steps.append(f"{terms[i]} * {terms[i + 1]} = {v}.")
        terms[i:i + 2], ops[i:i + 1] = [v], []
    while ops:
        v = terms[0] + terms[1] if ops[0] == "+" else terms[0] - terms[1]
        steps.append(f"{terms[0]} {ops[0]} {terms[1]} = {v}.")
        terms[0:2], ops[0:1] = [v], []
    return terms[0], steps


def arithmetic_problems(n: int, seed: int = 0, n_terms: tuple[int, int] = (2, 3), max_operand: int = 9,
                        ops: str = "+-*") -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(*n_terms)
        terms = [rng.randint(0, max_operand) for _ in range(k)]
        chosen = [rng.choice(ops) for _ in range(k - 1)]
        value, steps = _solve(terms, chosen)
        expr = " ".join(str(t) + (f" {o}" if j < len(chosen) else "") for j, (t, o) in enumerate(zip(terms, chosen + [""])))
        out.append({"question": f"What is {expr}?", "answer": value,
                    "solution": " ".join(steps + [f"The answer is {value}."])})
    return out


def _to_number(s: str):
    s = s.replace(",", "").rstrip(".")
    try:
        return int(s)
    except ValueError:
        try:
            return float(s)
        except ValueError:
            return None


def extract_answer(text: str):
    for pat in (rf"[Tt]he answer is\s*\$?({NUM})", rf"####\s*\$?({NUM})"):
        m = re.search(pat, text)
        if m:
            return _to_number(m.group(1))
    nums = re.findall(NUM, text)
    return _to_number(nums[-1]) if nums else None


def numeric_reward(text: str, answer, format_bonus: float = 0.0) -> float:
    got = extract_answer(text)
    correct = got is not None and abs(float(got) - float(answer)) < 1e-6
    fmt = format_bonus if re.search(r"[Tt]he answer is", text) else 0.0
    return float(correct) + fmt


def unit_test_reward(program: str, tests: list[str], timeout: float = 5.0) -> float:
    """Fraction of `tests` (assert statements) that pass after `program`, each in a fresh sandboxed interpreter."""
    from ..prompting.sandbox import run_python

    if not tests:
        raise ValueError("unit_test_reward needs at least one test")
    passed = sum(run_python(program + "\n" + t + "\n", timeout=timeout).ok for t in tests)
    return passed / len(tests)


def token_reward_fn(tokenizer, text_reward, stop: str | None = None):
    """(items, completions as token ids) -> rewards, decoding each completion and cutting it at `stop`."""
    def fn(items, completions):
        out = []
        for item, ids in zip(items, completions):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            if stop and stop in text:
                text = text[: text.index(stop)]
            out.append(text_reward(text, item))
        return out
    return fn


# ---------------------------------------------------------------------------------------------- process rewards
STEP = re.compile(rf"({NUM})\s*([-+*])\s*({NUM})\s*=\s*({NUM})")


def step_scores(text: str) -> list[float]:
    """A rule-based process reward model for worked arithmetic: 1 per correct 'a op b = c' step, 0 per wrong one
    (PRM800K-style step labels, here checked exactly instead of learned)."""
    out = []
    for a, op, b, c in STEP.findall(text):
        a, b, c = _to_number(a), _to_number(b), _to_number(c)
        v = a + b if op == "+" else a - b if op == "-" else a * b
        out.append(float(v == c))
    return out


def prm_aggregate(scores: list[float], how: str = "min") -> float:
    """Solution score from step scores: the weakest step (min) or the product (probability all steps are right)."""
    if not scores:
        return 0.0
    if how == "min":
        return min(scores)
    if how == "prod":
        p = 1.0
        for s in scores:
            p *= s
        return p
    raise ValueError(f"unknown PRM aggregation {how!r}; choose min or prod")


def multi_reward(rewards: list[list[float]], weights: list[float] | None = None, whiten: bool = True) -> list[float]:
    """Combine several reward models (one per criterion, e.g. helpful / harmless): each standardised, then weighted."""
    import statistics

    weights = weights or [1.0] * len(rewards)
    out = [0.0] * len(rewards[0])
    for w, rs in zip(weights, rewards):
        mu, sd = statistics.fmean(rs), (statistics.pstdev(rs) or 1.0)
        for i, r in enumerate(rs):
            out[i] += w * ((r - mu) / sd if whiten else r)
    return out
