"""Synthetic symbolic-reasoning tasks with computable answers (survey §7.1.3; Wei et al. 2022, CoT paper §5).

Implements seeded generators (same seed, same items) for quick capability curves that need no data files:
- last-letter concatenation: 'Take the last letters of the words in "Elon Musk" and concatenate them.' -> "nk";
- coin flip: a coin starts heads up; each of n people flips it or not; "Is the coin still heads up?" -> yes/no;
- arithmetic: multi-digit a+b, a-b, a*b with the digits as a difficulty knob.
Demonstrations come from the same generator with a different seed, so they never leak the test items.
"""
from __future__ import annotations

import random

from ..metrics import extract_number, extract_text_answer
from .base import GenTask

# first names for last-letter / coin-flip items (Wei et al. sampled from name-census lists; any names work)
NAMES = ["Elon", "Musk", "Larry", "Page", "Sergey", "Brin", "Bill", "Gates", "Ada", "Lovelace", "Alan", "Turing",
         "Grace", "Hopper", "Linus", "Torvalds", "Donald", "Knuth", "Barbara", "Liskov", "Ken", "Thompson", "Dennis",
         "Ritchie", "Margaret", "Hamilton", "Tim", "Berners", "Lee", "Frances", "Allen", "Edsger", "Dijkstra"]


def last_letter_items(n: int, seed: int, words: int = 2) -> list[dict]:
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        ws = rng.sample(NAMES, words)
        q = f'Take the last letters of the words in "{" ".join(ws)}" and concatenate them.'
        a = "".join(w[-1] for w in ws)
        r = " ".join(f'The last letter of "{w}" is "{w[-1]}".' for w in ws) + f' Concatenating them is "{a}".'
        items.append({"question": q, "answer": a, "rationale": r})
    return items


def coin_flip_items(n: int, seed: int, people: int = 2) -> list[dict]:
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        who = rng.sample(NAMES, people)
        flips = [rng.random() < 0.5 for _ in who]
        steps = " ".join(f"{p} {'flips' if f else 'does not flip'} the coin." for p, f in zip(who, flips))
        q = f"A coin is heads up. {steps} Is the coin still heads up?"
        k = sum(flips)
        a = "yes" if k % 2 == 0 else "no"
        r = f"The coin was flipped {k} time{'s' if k != 1 else ''}, an {'even' if k % 2 == 0 else 'odd'} number."
        items.append({"question": q, "answer": a, "rationale": r})
    return items


def arithmetic_items(n: int, seed: int, digits: int = 2, ops: str = "+-*") -> list[dict]:
    rng = random.Random(seed)
    lo, hi = 10 ** (digits - 1), 10 ** digits - 1
    items = []
    for _ in range(n):
        a, b, op = rng.randint(lo, hi), rng.randint(lo, hi), rng.choice(ops)
        val = {"+": a + b, "-": a - b, "*": a * b}[op]
        items.append({"question": f"What is {a} {op} {b}?", "answer": str(val), "rationale": f"{a} {op} {b} = {val}."})
    return items


def _norm_word(s: str | None) -> str | None:
    return None if s is None else s.strip().strip('".').lower().split()[0] if s.strip() else None


def symbolic_task(kind: str, n: int = 100, seed: int = 0, **kw) -> GenTask:
    gen = {"last_letter": last_letter_items, "coin_flip": coin_flip_items, "arithmetic": arithmetic_items}[kind]
    extract = extract_number if kind == "arithmetic" else (lambda s: _norm_word(extract_text_answer(s)))
    return GenTask(kind, default_fewshot=3, loader=lambda: gen(n, seed, **kw),
                   fewshot_loader=lambda: gen(64, seed + 10_000, **kw),
                   text_fn=lambda d: "Q: " + d["question"] + "\nA:",
                   target_fn=lambda d: f"The answer is {d['answer']}.", answer_fn=lambda d: d["answer"],
                   extract_fn=extract, stop=["\n\n", "\nQ:"], max_new_tokens=48,
                   cot_demos=None)


def cot_demo(doc: dict) -> str:
    """A symbolic item rendered as a chain-of-thought demo."""
    return f"Q: {doc['question']}\nA: {doc['rationale']} The answer is {doc['answer']}."
