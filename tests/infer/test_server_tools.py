"""tools_call.py: calculator exactness and safety, tool-call parsing, streaming hold-back, prompt rendering,
and the page's /tools endpoints (calculator; Python through llmkit.prompting.sandbox)."""
import json
import math

import httpx
import pytest
import torch

from llmkit.infer.tools_call import (OPEN, calculator, parse_tool_calls, render_chat, run_builtin_tool,
                                     tool_safe_len)
from serve_util import one_torch_thread, running_server, tiny_model, tiny_tokenizer  # noqa: F401

TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize("expr", ["1+2*3", "(3+4)*2**10", "7/2", "7//2", "-7 % 3", "2**-2", "1e3*3.5", "((1))"])
def test_calculator_matches_python(expr):
    assert calculator(expr) == str(eval(expr))  # noqa: S307 - the reference on fixed literals


def test_calculator_functions_and_refusals():
    assert calculator("sqrt(2)") == str(math.sqrt(2)) and calculator("pi*2") == str(math.pi * 2)
    for bad in ("__import__('os').system('id')", "open('/etc/passwd')", "(1).__class__", "[1,2]", "x", "9**9**9",
                "2**100000", "1/0", "sqrt(-1)", "a" * 600):
        assert calculator(bad).startswith("error:"), bad


def test_parse_tool_calls_forms():
    args = {"a": 2, "b": 3}
    for text in (f'{OPEN}[{{"name": "add", "arguments": {json.dumps(args)}}}]</tool_call>',
                 f'{OPEN}{{"name": "add", "arguments": {json.dumps(args)}}}</tool_call>',
                 f'{OPEN}{{"name": "add", "arguments": {json.dumps(json.dumps(args))}}}',  # string args, no close tag
                 f'{{"name": "add", "parameters": {json.dumps(args)}}}'):
        content, calls = parse_tool_calls(text, TOOLS)
        assert content == "" and len(calls) == 1, text
        assert calls[0]["function"]["name"] == "add" and json.loads(calls[0]["function"]["arguments"]) == args
        assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    two = f'Let me check.{OPEN}[{{"name": "add", "arguments": {{}}}}, {{"name": "weather", "arguments": {{"city": "Oslo"}}}}]</tool_call>'
    content, calls = parse_tool_calls(two, TOOLS)
    assert content == "Let me check." and [c["function"]["name"] for c in calls] == ["add", "weather"]
    for text in ("plain answer", f'{OPEN}[{{"name": "rm_rf", "arguments": {{}}}}]</tool_call>', f"{OPEN}not json</tool_call>",
                 '{"not": "a call"}'):
        assert parse_tool_calls(text, TOOLS) == (text, None)
    assert parse_tool_calls(f'{OPEN}[{{"name": "add", "arguments": {{}}}}]</tool_call>', None)[1] is None


def test_tool_safe_len_never_shows_a_call():
    assert tool_safe_len("Hello world") == 11
    assert tool_safe_len("Hello <tool") == len("Hello ")
    assert tool_safe_len("Hi <tool_call>[{") == 3
    assert tool_safe_len('  {"name"') == 0
    assert tool_safe_len("a < b") == 5


def test_render_chat_with_and_without_tool_aware_template():
    tok = tiny_tokenizer()
    msgs = [{"role": "user", "content": "2+3?"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function",
             "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
            {"role": "tool", "content": "5"}]
    text = render_chat(tok, msgs, TOOLS)  # ChatML template without tool support: tools go in a system message
    assert text.startswith("<|im_start|>system\nYou are an expert in composing functions")
    assert '"name": "weather"' in text and '<tool_call>[{"name": "add", "arguments": {"a": 2, "b": 3}}]</tool_call>' in text
    assert "<tool_response>5</tool_response>" in text and text.endswith("<|im_start|>assistant\n")
    tok.chat_template = ("{% if tools %}TOOLS={{ tools | tojson }}\n{% endif %}{% for m in messages %}"
                         "[{{ m.role }}]{{ m.content }}\n{% endfor %}")
    text = render_chat(tok, msgs[:1], TOOLS)  # a template that knows tools receives them itself
    assert text.startswith('TOOLS=[{"type": "function"') and "[user]2+3?" in text


def test_tools_endpoints_calculator_and_python():
    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    with running_server(tiny_model(tok), tok, "tiny", python_tool=True) as (url, _):
        names = [t["function"]["name"] for t in httpx.get(url + "/tools").json()["tools"]]
        assert names == ["calculator", "python"]
        r = httpx.post(url + "/tools/run", json={"name": "calculator", "arguments": '{"expression": "6*7"}'})
        assert r.json()["content"] == "42"
        r = httpx.post(url + "/tools/run", json={"name": "python", "arguments": {"code": "print(sum(range(10)))"}}, timeout=30)
        assert r.json()["content"].strip() == "45"
        r = httpx.post(url + "/tools/run", json={"name": "python", "arguments": {"code": "import socket; socket.socket()"}}, timeout=30)
        assert "[error]" in r.json()["content"]  # the sandbox refuses sockets
        assert httpx.post(url + "/tools/run", json={"name": "shell", "arguments": {}}).status_code == 404
        assert httpx.post(url + "/tools/run", json={"name": "calculator", "arguments": "{bad"}).status_code == 400
    with running_server(tiny_model(tok), tok, "tiny") as (url, _):  # python is opt-in
        listing = httpx.get(url + "/tools").json()
        assert [t["function"]["name"] for t in listing["tools"]] == ["calculator"] and "--python-tool" in listing["note"]
        assert httpx.post(url + "/tools/run", json={"name": "python", "arguments": {"code": "print(1)"}}).status_code == 404
    with pytest.raises(KeyError):
        run_builtin_tool("python", {"code": "print(1)"}, python=False)
