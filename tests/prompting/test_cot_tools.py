"""CoT prompts (golden strings), zero-shot CoT two-stage, self-consistency, least-to-most, calculator, ReAct, PAL."""
import re

import pytest

from llmkit.eval.lm import LM, LlmkitLM
from llmkit.prompting import cot, tools


class ScriptedLM(LM):
    """Answers generate() calls from a list of (regex on the prompt, reply or reply(prompt, seed, temperature))."""

    def __init__(self, script):
        self.script, self.calls = script, []

    def generate(self, prompts, *, max_new_tokens=64, temperature=0.0, top_p=1.0, stop=None, seed=0):
        out = []
        for i, p in enumerate(prompts):
            self.calls.append(p)
            for pat, reply in self.script:
                if re.search(pat, p, re.S):
                    text = reply(p, seed + i, temperature) if callable(reply) else reply
                    break
            else:
                text = ""
            for s in stop or ():
                text = text.split(s)[0]
            out.append(text)
        return out


def test_few_shot_cot_prompt_golden():
    p = cot.few_shot_cot_prompt([("What is 2 + 3?", "2 + 3 = 5.", "5"), ("What is 4 * 2?", "4 * 2 = 8.", "8")],
                                "What is 7 - 1?")
    assert p == ("Q: What is 2 + 3?\nA: 2 + 3 = 5. The answer is 5.\n\nQ: What is 4 * 2?\nA: 4 * 2 = 8. "
                 "The answer is 8.\n\nQ: What is 7 - 1?\nA:")


def test_zero_shot_cot_two_stages():
    lm = ScriptedLM([(r"arabic numerals\) is$", " 42."), (r"step by step\.$", " 6 times 7 is 42.")])
    (r,) = cot.zero_shot_cot(lm, ["What is 6 * 7?"])
    assert lm.calls[0] == "Q: What is 6 * 7?\nA: Let's think step by step."
    assert lm.calls[1] == ("Q: What is 6 * 7?\nA: Let's think step by step. 6 times 7 is 42.\n"
                           "Therefore, the answer (arabic numerals) is")
    assert r["answer"] == "42"


def test_self_consistency_votes_and_breaks_ties_deterministically():
    answers = {0: "8", 1: "9", 2: "9", 3: "8"}  # sample j of the prompt uses seed 7919*j

    def reply(p, seed, temp):
        assert temp > 0
        return f"... The answer is {answers[seed // 7919]}."
    lm = ScriptedLM([(r".", reply)])
    v = cot.self_consistency(lm, ["Q: x\nA:"], n=3)[0]
    assert v.answer == "9" and v.answers == ["8", "9", "9"] and v.agreement == pytest.approx(2 / 3)
    v4 = cot.self_consistency(lm, ["Q: x\nA:"], n=4)[0]  # 2-2 tie: the first-seen answer, every time
    assert v4.answer == "8"
    assert all(cot.self_consistency(lm, ["Q: x\nA:"], n=4)[0].answer == "8" for _ in range(3))


def test_self_consistency_with_a_real_model_is_reproducible(tiny):
    model, tok = tiny
    lm = LlmkitLM(model, tok)
    a = cot.self_consistency(lm, ["Q: What is 2 + 3?\nA:"], n=3, max_new_tokens=6, seed=1)
    b = cot.self_consistency(lm, ["Q: What is 2 + 3?\nA:"], n=3, max_new_tokens=6, seed=1)
    assert [v.samples for v in a] == [v.samples for v in b]


def test_least_to_most_threads_sub_answers():
    lm = ScriptedLM([
        (r"we need to know:$", " How many apples does Amy have?; How many does Bob have?"),
        (r"Q: How many apples does Amy have\?\nA:$", " Amy has 3."),
        (r"Amy has 3\.\n\nQ: How many does Bob have\?\nA:$", " Bob has 3 + 2 = 5."),
        (r"Bob has 3 \+ 2 = 5\.\n\nQ: Amy has 3 apples.*together\?\nA:$", " 3 + 5 = 8."),
    ])
    r = cot.least_to_most(lm, "Amy has 3 apples, Bob 2 more. How many together?", decompose_demos="", solve_demos="")
    assert r["subquestions"] == ["How many apples does Amy have?", "How many does Bob have?"]
    assert r["answer"] == "3 + 5 = 8." and "Bob has 3 + 2 = 5." in r["steps"][2]["prompt"]


@pytest.mark.parametrize("expr, want", [("2 + 3 * 4", "14"), ("0.1 + 0.2", "0.3"), ("1/3 * 3", "1"), ("1/3", "1/3"),
                                        ("2 ** 10", "1024"), ("(7 - 10) / 4", "-0.75"), ("12,000 x 3", "36000"),
                                        ("1/0", "Error: division by zero"), ("__import__('os')", None)])
def test_calculator_is_exact_and_evaluates_nothing_else(expr, want):
    got = tools.calculator(expr)
    assert got.startswith("Error") if want is None else got == want


def test_parse_action_formats():
    assert tools.parse_action("I should compute.\nAction: calculator[3 * 7]") == ("calculator", "3 * 7")
    assert tools.parse_action('Action: {"tool": "python", "input": "print(1)"}') == ("python", "print(1)")
    assert tools.parse_action("no action here") is None


def test_react_uses_tools_and_respects_the_step_budget():
    def policy(p, seed, temp):
        if "Observation: 21" in p:
            return " I know it now.\nFinal Answer: 21"
        return " I need to multiply.\nAction: calculator[3 * 7]\nObservation: (hallucinated)"
    r = tools.react(ScriptedLM([(r".", policy)]), "What is 3 times 7?")
    assert r["status"] == "answered" and r["answer"] == "21"
    assert r["trajectory"][0]["observation"] == "21" and "(hallucinated)" not in r["prompt"]
    loop = tools.react(ScriptedLM([(r".", " Again.\nAction: calculator[1 + 1]")]), "loop", max_steps=3)
    assert loop["status"] == "step_limit" and len(loop["trajectory"]) == 3
    py = tools.react(ScriptedLM([(r"Observation: 120", "Final Answer: 120"),
                                 (r".", " Action: python[import math; print(math.factorial(5))]")]), "5!?")
    assert py["answer"] == "120" and py["trajectory"][0]["observation"] == "120"
    bad = tools.react(ScriptedLM([(r"Observation: Error", "Final Answer: none"), (r".", "Action: search[x]")]), "q")
    assert "unknown tool" in bad["trajectory"][0]["observation"]


def test_program_aided_runs_code_in_the_sandbox_and_kills_loops():
    lm = ScriptedLM([(r".", "    apples = 23 - 15\n    result = apples * 2\n    return result\n")])
    r = tools.program_aided(lm, "Olivia has ...")
    assert r["answer"] == "16" and r["status"] == "ok"
    loop = tools.program_aided(ScriptedLM([(r".", "    while True:\n        pass\n")]), "q", timeout=1.0)
    assert loop["answer"] is None and loop["status"] in ("timeout", "killed")


def test_agent_success_rate_in_a_toy_environment_equals_the_expected_value():
    table = {"capital of france": "Paris", "capital of peru": "Lima", "capital of chad": "N'Djamena"}
    env = {"lookup": tools.lookup_tool(table), "calculator": tools.calculator}
    # scripted policy: looks up the question's key, answers with the observation; it knows only 2 of 3 keys
    known = {"capital of france", "capital of peru"}

    def policy(p, seed, temp):
        q = re.search(r"Question: (.*)\n", p).group(1).lower()
        m = re.search(r"Observation: (.*)\nThought:$", p)
        if m:
            return f" Done.\nFinal Answer: {m.group(1)}"
        return f" Look it up.\nAction: lookup[{q if q in known else 'capital'}]"
    lm = ScriptedLM([(r".", policy)])
    results = [tools.react(lm, q, env)["answer"] == a for q, a in table.items()]
    assert sum(results) / len(results) == pytest.approx(2 / 3)


def test_reflexion_memory_persists_across_trials():
    def policy(p, seed, temp):
        if p.endswith("Reflection:"):
            return " Use the calculator instead of guessing."
        if "Observation: 391" in p:
            return " Final Answer: 391"
        if "Reflection: Use the calculator" in p:
            return " Compute.\nAction: calculator[17 * 23]"
        return " Guess.\nFinal Answer: 400"
    lm = ScriptedLM([(r".", policy)])
    memory = []
    r = tools.reflexion(lm, "What is 17 * 23?", lambda a: a == "391", memory=memory)
    assert r["success"] and r["trials"] == 2 and memory == ["Use the calculator instead of guessing."]
    r2 = tools.reflexion(lm, "What is 17 * 23?", lambda a: a == "391", memory=memory)
    assert r2["trials"] == 1  # the stored reflection helps from the first trial on
    assert tools.reflexion(ScriptedLM([(r".", " Final Answer: 1")]), "q", lambda a: False, trials=2)["success"] is False
