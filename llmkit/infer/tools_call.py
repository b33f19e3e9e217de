"""Tool (function) calling in the OpenAI format (survey §6.4 tool use, §7.2.3 tool manipulation).

Implements:
- `render_chat`: OpenAI chat messages (with `tool_calls` and `tool` results) and `tools` -> the
  model's prompt text. A chat template that knows tools gets them directly; otherwise the tools are
  described in a system message in the convention SmolLM2-Instruct was tuned on (a `<tools>` JSON
  list, calls written as `<tool_call>[{"name": ..., "arguments": {...}}]</tool_call>`), which is also
  the Hermes/Qwen convention, so it is the generic JSON tool-call format for other models too;
- `parse_tool_calls`: model output -> (remaining text, OpenAI `tool_calls` or None); accepts the
  tagged form (object or list, closing tag optional) and a bare JSON `{"name", "arguments"}` reply;
- `tool_safe_len`: how much of a partial reply is surely not a tool call (streaming holds back the rest);
- built-in tools for the web page: `calculator` (an `ast` evaluator of arithmetic, no `eval`) and
  `python`, run in `llmkit.prompting.sandbox` when that module is present (not otherwise).

The calculator covers + - * / // % **, unary signs, parentheses and the functions/constants of
`_FUNCS`; exponents are bounded so that a request cannot make the server compute 9**9**9.
"""
from __future__ import annotations

import ast
import json
import math
import operator
import re
import uuid

OPEN, CLOSE = "<tool_call>", "</tool_call>"

TOOLS_PROMPT = (
    "You are an expert in composing functions. You are given a question and a set of possible functions. "
    "Based on the question, you may make one or more function/tool calls to achieve the purpose. "
    "If no function is needed, answer normally.\n\n"
    "You have access to the following tools:\n<tools>{tools}</tools>\n\n"
    "To call tools, reply with only:\n"
    '<tool_call>[{{"name": "func_name", "arguments": {{"argument1": "value1"}}}}]</tool_call>'
)


def _fn(tool: dict) -> dict:
    return tool.get("function", tool)


def _template_knows_tools(tokenizer) -> bool:
    return "tools" in (getattr(tokenizer, "chat_template", None) or "")


def _plain_messages(messages: list[dict], keep_tool_role: bool) -> list[dict]:
    """Assistant tool calls become `<tool_call>` text and tool results `<tool_response>` text."""
    out = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "developer":
            role = "system"
        if role == "assistant" and m.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": _loads_or_str(c["function"].get("arguments"))}
                     for c in m["tool_calls"]]
            content = (content + "\n" if content else "") + OPEN + json.dumps(calls) + CLOSE
        if role == "tool":
            content = f"<tool_response>{content}</tool_response>"
            role = "tool" if keep_tool_role else "user"
        out.append({"role": role, "content": content})
    return out


def render_chat(tokenizer, messages: list[dict], tools: list[dict] | None) -> str:
    """The prompt text for `messages` (plain-text content) and optional OpenAI `tools`."""
    knows = _template_knows_tools(tokenizer)
    msgs = _plain_messages(messages, keep_tool_role=knows or "tool" in (getattr(tokenizer, "chat_template", "") or ""))
    if tools and knows:
        return tokenizer.apply_chat_template(msgs, tools=tools, add_generation_prompt=True, tokenize=False)
    if tools:
        spec = TOOLS_PROMPT.format(tools=json.dumps([_fn(t) for t in tools]))
        if msgs and msgs[0]["role"] == "system":
            msgs = [{"role": "system", "content": msgs[0]["content"] + "\n\n" + spec}] + msgs[1:]
        else:
            msgs = [{"role": "system", "content": spec}] + msgs
    return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def _loads_or_str(s):
    if not isinstance(s, str):
        return s
    try:
        return json.loads(s)
    except ValueError:
        return s


def _as_calls(obj) -> list[dict] | None:
    items = obj if isinstance(obj, list) else [obj]
    calls = []
    for it in items:
        if not isinstance(it, dict) or not isinstance(it.get("name"), str):
            return None
        args = it.get("arguments", it.get("parameters", {}))
        args = _loads_or_str(args)
        calls.append({"name": it["name"], "arguments": args if isinstance(args, dict) else {"input": args}})
    return calls


def parse_tool_calls(text: str, tools: list[dict] | None) -> tuple[str, list[dict] | None]:
    """Split model output into (content, tool_calls in OpenAI form); calls to unknown tools are ignored."""
    if not tools:
        return text, None
    names = {_fn(t).get("name") for t in tools}
    calls, content = [], text
    for m in re.finditer(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + r"|$)", text, re.S):
        parsed = _as_calls(_loads_or_str(m.group(1).strip()))
        if parsed:
            calls += parsed
            content = content.replace(m.group(0), "")
    if not calls and text.strip().startswith("{"):
        parsed = _as_calls(_loads_or_str(text.strip()))
        if parsed:
            calls, content = parsed, ""
    calls = [c for c in calls if c["name"] in names]
    if not calls:
        return text, None
    return content.strip(), [
        {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
         "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}}
        for c in calls
    ]


def tool_safe_len(text: str) -> int:
    """How much of a partial reply can be streamed as content: never a (possible start of a) tool call."""
    if text.lstrip().startswith("{"):
        return 0  # may be a bare JSON call; decided when the reply ends
    if OPEN in text:
        return text.index(OPEN)
    for k in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if text.endswith(OPEN[:k]):
            return len(text) - k
    return len(text)


# ---------------------------------------------------------------------- built-in tools (web page)
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNOPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCS = {"sqrt": math.sqrt, "log": math.log, "log10": math.log10, "exp": math.exp, "sin": math.sin,
          "cos": math.cos, "tan": math.tan, "abs": abs, "round": round, "floor": math.floor, "ceil": math.ceil}
_CONSTS = {"pi": math.pi, "e": math.e}
MAX_EXPONENT = 1000  # keeps x**y cheap; far beyond what a chat question needs


def _eval(node):
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTS:
        return _CONSTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNOPS:
        return _UNOPS[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, b = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(b) > MAX_EXPONENT:
            raise ValueError(f"exponent {b} is too large (limit {MAX_EXPONENT})")
        return _BINOPS[type(node.op)](a, b)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS
            and not node.keywords):
        return _FUNCS[node.func.id](*[_eval(a) for a in node.args])
    raise ValueError(f"unsupported expression element: {ast.dump(node)[:60]}")


def calculator(expression: str) -> str:
    """Exact arithmetic on `expression` (Python syntax); errors come back as text for the model."""
    if len(expression) > 500:
        return "error: expression longer than 500 characters"
    try:
        return str(_eval(ast.parse(expression, mode="eval")))
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError) as e:
        return f"error: {e}"


def _sandbox():
    try:
        from llmkit.prompting import sandbox
    except ImportError:
        return None
    return sandbox


CALCULATOR_SPEC = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression, e.g. (3+4)*2**10 or sqrt(2).",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}
PYTHON_SPEC = {"type": "function", "function": {
    "name": "python", "description": "Run a short Python program in a sandbox and return what it prints.",
    "parameters": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}}}


def builtin_tools(python: bool) -> list[dict]:
    """Tool specs the web page offers: the calculator, plus Python when enabled and the sandbox exists."""
    return [CALCULATOR_SPEC] + ([PYTHON_SPEC] if python and _sandbox() is not None else [])


def run_builtin_tool(name: str, arguments: dict, python: bool) -> str:
    if name == "calculator":
        return calculator(str(arguments.get("expression", "")))
    if name == "python" and python and _sandbox() is not None:
        return _run_python(str(arguments.get("code", "")))
    raise KeyError(f"unknown tool {name!r}; available: {[_fn(t)['name'] for t in builtin_tools(python)]}")


def _run_python(code: str) -> str:
    """stdout (+ stderr, status) of `code` run by `llmkit.prompting.sandbox.run_python` (5 s, 256 MB)."""
    res = _sandbox().run_python(code[:20_000], timeout=5.0, memory_mb=256)
    out = res.stdout[-4000:]  # the model's context is short; keep the tail, where results are printed
    if not res.ok:
        out += f"\n[{res.status}] {res.stderr[-2000:]}"
    return out
