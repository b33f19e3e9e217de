"""Best-of-n, rejection sampling, process rewards (PRM selection beats a random pick), multi-RM aggregation,
critique-and-revise with a scripted LLM, arithmetic generator and answer extraction."""
import random

import torch

from llmkit.adapt import instruct_data as idata
from llmkit.adapt import rewards as rw
from llmkit.adapt.rollout import best_of_n, rejection_sample, sample


def test_arithmetic_problems_and_extraction():
    probs = rw.arithmetic_problems(200, seed=3, n_terms=(2, 4))
    for p in probs:
        expr = p["question"].removeprefix("What is ").removesuffix("?")
        assert eval(expr) == p["answer"]  # the worked steps follow Python's precedence
        assert rw.extract_answer(p["solution"]) == p["answer"] and rw.step_scores(p["solution"]) == [1.0] * len(rw.step_scores(p["solution"]))
    assert rw.extract_answer("so #### 1,234") == 1234 and rw.extract_answer("x 3 then 7") == 7
    assert rw.numeric_reward("The answer is 12.", 12, format_bonus=0.1) == 1.1 and rw.numeric_reward("12", 13) == 0.0


def test_best_of_n_returns_argmax_and_rejection_sampling(tiny):
    reward = lambda prompts, comps: [sum(t % 5 == 0 for t in c) for c in comps]  # noqa: E731
    g = torch.Generator().manual_seed(0)
    best, r, allr = best_of_n(tiny, [5, 6, 7], 8, reward, 6, eos_id=None, generator=g)
    assert r == max(allr) and reward(None, [best])[0] == r
    kept = rejection_sample(tiny, [[5, 6], [7, 8]], 4, reward, threshold=1, max_new_tokens=6, eos_id=None,
                            generator=torch.Generator().manual_seed(1))
    assert all(k["reward"] >= 1 for k in kept)


def test_sampling_matches_full_forward_greedy(tiny):
    """The cached sampler (left padding, per-row positions) picks what an uncached forward picks."""
    prompts = [[5, 6, 7, 8], [9, 10]]
    r = sample(tiny, prompts, 5, eos_id=None, temperature=0.0)
    for p, c in zip(prompts, r.completions()):
        ids = list(p)
        for _ in range(5):
            ids.append(int(tiny(torch.tensor([ids]))[0, -1].argmax()))
        assert c == ids[len(p):]


def test_prm_selection_beats_random_pick():
    rng = random.Random(0)
    probs = rw.arithmetic_problems(200, seed=4, n_terms=(3, 3))
    prm_right = rand_right = 0
    for p in probs:
        cands = []
        for _ in range(4):  # a noisy solver: each step is wrong with probability 0.3, errors propagate
            text = p["solution"]
            steps = rw.STEP.findall(text)
            if steps and rng.random() < 0.6:
                a, op, b, c = rng.choice(steps)
                wrong = str(int(c) + rng.choice([-2, -1, 1, 2]))
                text = text.replace(f"= {c}.", f"= {wrong}.", 1)
                text = text.replace(f"The answer is {p['answer']}.", f"The answer is {wrong}.") if c == str(p["answer"]) else text
            cands.append(text)
        pick = max(cands, key=lambda t: rw.prm_aggregate(rw.step_scores(t), "min"))
        prm_right += rw.extract_answer(pick) == p["answer"]
        rand_right += rw.extract_answer(rng.choice(cands)) == p["answer"]
    assert prm_right > rand_right + 20


def test_multi_reward_whitened_and_critique_revise():
    combined = rw.multi_reward([[1.0, 2.0, 3.0], [10.0, 10.0, 40.0]], weights=[1.0, 0.5])
    assert combined.index(max(combined)) == 2
    script = {"Critique": "It is rude.", "Revision": "Please, here is the answer."}

    def fake_llm(prompt):
        return script["Critique" if prompt.endswith("Critique:") else "Revision"]

    trace = idata.critique_revise(fake_llm, "Answer me", "No.", ["be polite"], rounds=2)
    assert len(trace) == 2 and trace[-1]["revision"] == "Please, here is the answer." and trace[0]["critique"] == "It is rude."
