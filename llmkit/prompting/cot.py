"""Chain-of-thought prompting (survey §6.3): few-shot / zero-shot CoT, self-consistency, least-to-most.

Implements, on any `llmkit.eval.lm.LM`:
- `few_shot_cot_prompt`: <input, rationale, output> demos, "Q: ...\\nA: <rationale> The answer is X." (Wei et al. 2022);
- `zero_shot_cot`: two-stage Kojima et al. (2022) — "Let's think step by step." to get a rationale, then an
  answer-extraction prompt ("Therefore, the answer (arabic numerals) is") whose output the extractor reads;
- `self_consistency`: n sampled reasoning paths, answers extracted, majority vote with a deterministic tie rule
  (first-seen answer wins; Wang et al. 2022);
- `least_to_most`: decompose into sub-questions with demos, then solve them in order, each answer threaded into
  the context of the next (Zhou et al. 2023).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from llmkit.eval.metrics import extract_number, majority_vote

ZERO_SHOT_TRIGGER = "Let's think step by step."
NUMERIC_ANSWER_TRIGGER = "Therefore, the answer (arabic numerals) is"  # Kojima et al. Table 9, arithmetic


def few_shot_cot_prompt(demos: Sequence[tuple[str, str, str]], question: str) -> str:
    """demos: (question, rationale, answer) triples."""
    shots = "".join(f"Q: {q}\nA: {r} The answer is {a}.\n\n" for q, r, a in demos)
    return shots + f"Q: {question}\nA:"


def zero_shot_cot(lm, questions: Sequence[str], *, trigger: str = ZERO_SHOT_TRIGGER,
                  answer_trigger: str = NUMERIC_ANSWER_TRIGGER, extract: Callable = extract_number,
                  max_reasoning_tokens: int = 128, max_answer_tokens: int = 16) -> list[dict]:
    """Stage 1 reasons, stage 2 reads the answer off; returns prompt, rationale, raw answer text and the answer."""
    first = [f"Q: {q}\nA: {trigger}" for q in questions]
    rationales = lm.generate(first, max_new_tokens=max_reasoning_tokens, stop=["\nQ:", "\n\n\n"])
    second = [f"{p}{r}\n{answer_trigger}" for p, r in zip(first, rationales)]
    answers = lm.generate(second, max_new_tokens=max_answer_tokens, stop=["\n"])
    return [{"prompt": s, "rationale": r, "answer_text": a, "answer": extract(a)}
            for s, r, a in zip(second, rationales, answers)]


@dataclass
class Vote:
    answer: object
    samples: list[str]
    answers: list[object]

    @property
    def agreement(self) -> float:
        return sum(a == self.answer for a in self.answers) / max(len(self.answers), 1)


def self_consistency(lm, prompts: Sequence[str], *, n: int = 5, temperature: float = 0.7, top_p: float = 1.0,
                     extract: Callable = extract_number, max_new_tokens: int = 128, stop=None, seed: int = 0) -> list[Vote]:
    """n samples per prompt (sample j uses seed + j: reproducible), majority vote over extracted answers.
    temperature 0.7 as in Wang et al. (2022)'s UL2/LaMDA runs."""
    samples = [lm.generate(list(prompts), max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                           stop=stop, seed=seed + 7919 * j) for j in range(n)]  # 7919: a prime stride between seeds
    votes = []
    for i in range(len(prompts)):
        texts = [samples[j][i] for j in range(n)]
        answers = [extract(t) for t in texts]
        votes.append(Vote(majority_vote(answers), texts, answers))
    return votes


def least_to_most(lm, question: str, *, decompose_demos: str, solve_demos: str, max_subquestions: int = 5,
                  max_new_tokens: int = 96) -> dict:
    """Stage 1: `decompose_demos + 'Q: question\\nA: To answer this, we need to know:'` lists sub-questions
    separated by ';' or newlines. Stage 2: each sub-question is asked after the previous Q/A pairs; the last
    answer is the result."""
    dec_prompt = f"{decompose_demos}Q: {question}\nA: To answer this, we need to know:"
    raw = lm.generate([dec_prompt], max_new_tokens=max_new_tokens, stop=["\n\n", "\nQ:"])[0]
    subs = [s.strip(" -.\n") for s in raw.replace("\n", ";").split(";") if s.strip(" -.\n")][:max_subquestions]
    context, steps = f"{solve_demos}{question}\n\n", []
    for sq in subs + [question]:
        prompt = f"{context}Q: {sq}\nA:"
        ans = lm.generate([prompt], max_new_tokens=max_new_tokens, stop=["\n\n", "\nQ:"])[0].strip()
        steps.append({"question": sq, "prompt": prompt, "answer": ans})
        context += f"Q: {sq}\nA: {ans}\n\n"
    return {"subquestions": subs, "steps": steps, "answer": steps[-1]["answer"]}
