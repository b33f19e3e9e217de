"""Metrics and answer extraction for survey §7.1 (Table 15's measures).

Implements:
- multiple choice: argmax of summed log-prob (`acc`) and of length-normalised log-prob (`acc_norm`, per character
  of the choice, as lm-evaluation-harness does);
- unbiased pass@k = 1 - C(n-c, k) / C(n, k) (Chen et al. 2021, the HumanEval paper), numerically stable form;
- SQuAD-style normalisation, exact match and token F1 (closed-book QA), max over gold aliases;
- answer extraction: GSM8K's "#### 42", "The answer is 42", the last number in a text; multiple-choice letters;
- Gorilla-style AST matching of API calls;
- the standard error of a mean (sample std / sqrt(n)) and a bootstrap for other aggregates;
- `majority_vote` with deterministic tie-breaking (self-consistency, Wang et al. 2022).
"""
from __future__ import annotations

import math
import random
import re
import string
from collections import Counter
from typing import Callable, Hashable, Sequence

import numpy as np


# --------------------------------------------------------------------------- multiple choice
def mc_predictions(logprobs: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """(argmax of raw log p, argmax of log p / characters of the choice: lm-eval's acc_norm); ties go to the
    first choice."""
    raw = int(np.argmax(logprobs))
    norm = int(np.argmax([lp / max(len(c), 1) for lp, c in zip(logprobs, choices)]))
    return raw, norm


# --------------------------------------------------------------------------- code
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - prod_{i=n-c+1}^{n} (1 - k/i) (Chen et al. 2021)."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


# --------------------------------------------------------------------------- QA
def normalize_answer(s: str) -> str:
    """SQuAD v1.1 normalisation: lower case, drop punctuation and articles, squeeze whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(pred: str, golds: Sequence[str] | str) -> float:
    golds = [golds] if isinstance(golds, str) else golds
    return float(max(normalize_answer(pred) == normalize_answer(g) for g in golds))


def f1_score(pred: str, golds: Sequence[str] | str) -> float:
    """Token-overlap F1 after normalisation, best over gold aliases (SQuAD)."""
    golds = [golds] if isinstance(golds, str) else golds
    best = 0.0
    p = normalize_answer(pred).split()
    for g in golds:
        t = normalize_answer(g).split()
        common = sum((Counter(p) & Counter(t)).values())
        if not p or not t:
            f = float(p == t)
        elif common == 0:
            f = 0.0
        else:
            prec, rec = common / len(p), common / len(t)
            f = 2 * prec * rec / (prec + rec)
        best = max(best, f)
    return best


# --------------------------------------------------------------------------- answer extraction
_NUM = r"-?[\d,]*\.?\d+"


def _clean_number(s: str) -> str:
    s = s.replace(",", "").rstrip(".")
    try:
        f = float(s)
    except ValueError:
        return s
    return str(int(f)) if f == int(f) else str(f)


def extract_gsm8k(text: str) -> str | None:
    """The number after the first '####' (GSM8K's gold format)."""
    m = re.search(r"####\s*\$?(" + _NUM + ")", text)
    return _clean_number(m.group(1)) if m else None


def extract_answer_is(text: str) -> str | None:
    """The number after 'The answer is' (few-shot CoT demos end this way, Wei et al. 2022)."""
    m = re.search(r"[Tt]he (?:final )?answer is[:\s]*\$?\s*(" + _NUM + ")", text)
    return _clean_number(m.group(1)) if m else None


def extract_last_number(text: str) -> str | None:
    nums = re.findall(_NUM, text)
    return _clean_number(nums[-1]) if nums else None


def extract_number(text: str) -> str | None:
    """'####' first, then 'The answer is', then the last number: the usual fallback chain."""
    for f in (extract_gsm8k, extract_answer_is, extract_last_number):
        a = f(text)
        if a is not None:
            return a
    return None


def extract_choice_letter(text: str, letters: str = "ABCD") -> str | None:
    """A choice letter: '(B)', 'answer is C', or a bare leading letter."""
    for pat in (rf"answer is \(?([{letters}])\)?", rf"\(([{letters}])\)", rf"^\s*([{letters}])\b"):
        m = re.search(pat, text)
        if m:
            return m.group(1)
    return None


def extract_text_answer(text: str) -> str:
    """After 'The answer is' when present, else the first line; for short free-form answers."""
    m = re.search(r"[Tt]he answer is[:\s]*(.+)", text)
    s = m.group(1) if m else (text.strip().splitlines() or [""])[0]
    return s.strip().rstrip(".").strip()


# --------------------------------------------------------------------------- tool calls (Gorilla APIBench)
def _call_parts(src: str):
    import ast

    try:
        node = ast.parse(src.strip(), mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(node, ast.Call):
        return None
    kwargs = {k.arg: ast.dump(k.value) for k in node.keywords}
    return ast.unparse(node.func), [ast.dump(a) for a in node.args], kwargs


def ast_match(pred: str, ref: str) -> bool:
    """Gorilla's AST sub-tree match, simplified: same callee and positional args, and every keyword argument of
    the reference present with the same value (extra keywords in the prediction are allowed)."""
    p, r = _call_parts(pred), _call_parts(ref)
    if p is None or r is None:
        return False
    return p[0] == r[0] and p[1] == r[1] and all(p[2].get(k) == v for k, v in r[2].items())


# --------------------------------------------------------------------------- aggregation
def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std, ddof=1, over sqrt n), as lm-eval reports."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return float("nan"), float("nan")
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else float("nan")
    return float(x.mean()), se


def bootstrap_stderr(values: Sequence, agg: Callable, iters: int = 1000, seed: int = 1234) -> float:
    """Bootstrap standard error of agg(values); 1000 resamples as lm-eval's default is 100000 (too slow here)."""
    rng = random.Random(seed)
    vals = list(values)
    stats = [agg([vals[rng.randrange(len(vals))] for _ in vals]) for _ in range(iters)]
    return float(np.std(stats, ddof=1))


def answers_match(a, b) -> bool:
    """Numbers compare by value ('18.0' == '18'); text after SQuAD normalisation; None never matches."""
    if a is None or b is None:
        return False
    try:
        return math.isclose(float(a), float(b), rel_tol=0, abs_tol=1e-9)
    except (TypeError, ValueError):
        return normalize_answer(str(a)) == normalize_answer(str(b))


def majority_vote(answers: Sequence[Hashable | None]) -> Hashable | None:
    """Most common non-None answer; a tie goes to the answer that appeared FIRST among the samples, so
    the vote is a pure function of the ordered samples (which a fixed seed makes reproducible)."""
    votes = [a for a in answers if a is not None]
    if not votes:
        return None
    counts = Counter(votes)
    top = max(counts.values())
    return next(a for a in votes if counts[a] == top)
