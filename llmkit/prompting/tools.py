"""Tool use and planning (survey §6.4, §7.2.3): calculator, sandboxed Python, a ReAct loop, program-aided reasoning.

Implements:
- `calculator(expr)`: exact arithmetic over an `ast` whitelist (+ - * / // % **, parentheses, unary signs) with
  `fractions.Fraction`, so 0.1 + 0.2 is 0.3 and 1/3*3 is 1; nothing else is evaluated;
- `python_tool(code)`: runs in `sandbox.run_python`, returns stdout (or the error's last line);
- `parse_action`: "Action: name[input]" / "Action: name(input)" / JSON {"tool": ..., "input": ...};
- `react(lm, question, tools, max_steps)`: Thought -> Action -> Observation loop (Yao et al. 2023) with a step
  budget; returns the answer, a status ("answered" | "step_limit" | "no_action") and the trajectory;
- `lookup_tool` (a toy key-value environment) and `reflexion`: ReAct trials with a persistent memory of
  self-reflections (Shinn et al. 2023);
- `program_aided(lm, question, demos)`: PAL (Gao et al. 2023): the model writes a `solution()` program, the
  sandbox runs it, the printed value is the answer.
"""
from __future__ import annotations

import ast
import json
import operator
import re
from fractions import Fraction
from typing import Callable

from .sandbox import run_python

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}


def _eval(node):
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return Fraction(str(node.value)) if isinstance(node.value, float) else Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        v = _eval(node.operand)
        return v if isinstance(node.op, ast.UAdd) else -v
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        a, b = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            if b.denominator != 1 or abs(b) > 1000:  # exact results only; 1000 bounds the work
                raise ValueError("only integer exponents up to 1000 are supported")
            return a ** int(b)
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and b == 0:
            raise ZeroDivisionError("division by zero")
        return _OPS[type(node.op)](a, b)
    raise ValueError(f"unsupported expression element: {type(node).__name__}")


def calculator(expr: str) -> str:
    """Exact value of an arithmetic expression as text ('7', '0.3', '1/3' when not a finite decimal)."""
    expr = expr.replace("^", "**").replace(",", "").replace("x", "*").replace("×", "*").replace("÷", "/").strip()
    try:
        v = _eval(ast.parse(expr, mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError, TypeError) as e:
        return f"Error: {e}"
    if v.denominator == 1:
        return str(v.numerator)
    d = v.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    if d == 1:  # a finite decimal: print it exactly
        s = f"{float(v):.15f}".rstrip("0")
        return s if Fraction(s) == v else str(v)
    return f"{v.numerator}/{v.denominator}"


def python_tool(code: str, timeout: float = 5.0) -> str:
    r = run_python(code, timeout=timeout, memory_mb=512)
    if r.ok:
        return r.stdout.strip() or "(no output)"
    last = (r.stderr.strip().splitlines() or [r.status])[-1]
    return f"Error ({r.status}): {last}"


DEFAULT_TOOLS: dict[str, Callable[[str], str]] = {"calculator": calculator, "python": python_tool}

_ACTION = re.compile(r"Action:\s*(\w+)\s*[\[(](.*)[\])]\s*$", re.S)


def parse_action(text: str) -> tuple[str, str] | None:
    """(tool, input) from the text after 'Action:'; JSON objects {"tool": ..., "input": ...} also work."""
    m = re.search(r"Action:\s*(\{.*\})", text, re.S)
    if m:
        try:
            d = json.loads(m.group(1))
            return str(d["tool"]), str(d.get("input", ""))
        except (json.JSONDecodeError, KeyError, TypeError):
            return None
    m = _ACTION.search(text.strip())
    return (m.group(1), m.group(2).strip()) if m else None


REACT_HEADER = (
    "Answer the question. You may use tools: {tools}.\nUse this format:\nThought: what to do next\n"
    "Action: tool[input]\nObservation: the tool's result\n... (repeat Thought/Action/Observation)\n"
    "Final Answer: the answer\n\n"
)


def react(lm, question: str, tools: dict[str, Callable[[str], str]] | None = None, *, max_steps: int = 5,
          demos: str = "", max_new_tokens: int = 96) -> dict:
    tools = tools or DEFAULT_TOOLS
    prompt = REACT_HEADER.format(tools=", ".join(tools)) + demos + f"Question: {question}\n"
    trajectory: list[dict] = []
    for _ in range(max_steps):
        out = lm.generate([prompt + "Thought:"], max_new_tokens=max_new_tokens, stop=["\nObservation:"])[0]
        step = {"thought": out.strip()}
        final = re.search(r"Final Answer:\s*(.*)", out)
        if final:
            step["final"] = final.group(1).strip().splitlines()[0] if final.group(1).strip() else ""
            trajectory.append(step)
            return {"answer": step["final"], "status": "answered", "trajectory": trajectory, "prompt": prompt}
        act = parse_action(out)
        if act is None:
            trajectory.append(step)
            return {"answer": None, "status": "no_action", "trajectory": trajectory, "prompt": prompt}
        name, arg = act
        obs = tools[name](arg) if name in tools else f"Error: unknown tool {name!r}; tools: {', '.join(tools)}"
        step |= {"action": name, "input": arg, "observation": obs}
        trajectory.append(step)
        prompt += f"Thought:{out.rstrip()}\nObservation: {obs}\n"
    return {"answer": None, "status": "step_limit", "trajectory": trajectory, "prompt": prompt}


PAL_SUFFIX = "\n    return result\n\nprint(solution())\n"


def program_aided(lm, question: str, *, demos: str = "", max_new_tokens: int = 192, timeout: float = 5.0) -> dict:
    """The model continues `def solution():` after PAL demos; the sandbox runs it and prints the result."""
    prompt = f'{demos}Q: {question}\n\n# solution in Python:\n\ndef solution():\n    """{question}"""\n'
    body = lm.generate([prompt], max_new_tokens=max_new_tokens, stop=["\nQ:", "\n\n\n", "\ndef "])[0]
    code = 'def solution():\n    """."""\n' + body
    if "return" not in body:
        code += PAL_SUFFIX
    else:
        code += "\n\nprint(solution())\n"
    r = run_python(code, timeout=timeout, memory_mb=512)
    answer = (r.stdout.strip().splitlines() or [None])[-1] if r.ok else None
    return {"answer": answer, "status": r.status, "code": code, "stderr": r.stderr[-500:]}


def lookup_tool(table: dict[str, str]) -> Callable[[str], str]:
    """A key-value 'search' tool over a fixed table (a toy text environment for agents)."""
    return lambda key: table.get(key.strip().lower(), f"No entry for {key!r}")


def reflexion(lm, question: str, check: Callable[[str | None], bool], *, trials: int = 3,
              memory: list[str] | None = None, tools: dict | None = None, max_steps: int = 5) -> dict:
    """Reflexion (Shinn et al. 2023): after a failed ReAct trial the model writes a one-line reflection that is
    kept in `memory` (a list the caller may keep across questions) and shown before every later trial."""
    memory = memory if memory is not None else []
    runs = []
    for t in range(trials):
        notes = "".join(f"Reflection: {m}\n" for m in memory)
        r = react(lm, question, tools, max_steps=max_steps, demos=notes)
        runs.append(r)
        if check(r["answer"]):
            return {"answer": r["answer"], "success": True, "trials": t + 1, "memory": memory, "runs": runs}
        note = lm.generate([r["prompt"] + f"\nThe answer {r['answer']!r} was wrong. Reflection:"],
                           max_new_tokens=64, stop=["\n"])[0].strip()
        memory.append(note)
    return {"answer": runs[-1]["answer"], "success": False, "trials": trials, "memory": memory, "runs": runs}
