"""The OpenAI-compatible server through the official `openai` client: plain, streaming, n/seed, stop,
completions, tool calls (a tiny model trained to emit one), and the greedy text equals the model's own."""
import json

import httpx
import openai
import pytest
import torch

from llmkit.infer.tools_call import render_chat
from serve_util import one_torch_thread, running_server, tiny_model, tiny_tokenizer, train_to_call  # noqa: F401

MSG = [{"role": "user", "content": "Hello, how are you today?"}]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok)


@pytest.fixture(scope="module")
def server(model, tok):
    torch.set_num_threads(1)
    with running_server(model, tok, "tiny") as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=30)


@torch.no_grad()
def greedy_reference(model, tok, text, n):
    ids = tok.encode(text)
    out = []
    for _ in range(n):
        t = int(model(torch.tensor([ids + out]))[0, -1].argmax())
        if t == tok.eos_token_id:
            break
        out.append(t)
    return tok.decode(out)


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server[0] + "/health").json()["status"] == "ok"


def test_chat_plain_equals_model_greedy_and_streaming_equals_plain(client, model, tok):
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=24, temperature=0)
    prompt = render_chat(tok, MSG, None)
    assert r.choices[0].message.content == greedy_reference(model, tok, prompt, 24)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 24
    assert r.usage.prompt_tokens == len(tok.encode(prompt))
    stream = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 24 and len([c for c in chunks if c.choices]) > 5


def test_n_and_seed_reproducible_and_distinct(client):
    kw = dict(model="tiny", messages=MSG, max_tokens=16, temperature=1.0, top_p=0.95, seed=7, n=3)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    ta, tb = [c.message.content for c in a.choices], [c.message.content for c in b.choices]
    assert ta == tb and len(set(ta)) == 3 and [c.index for c in a.choices] == [0, 1, 2]


def test_stop_string_cuts_and_reports_stop(client, model, tok):
    full = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=30, temperature=0).choices[0].message.content
    stop = full[10:13]
    cut = full[: full.index(stop)]
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    s = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=30, temperature=0, stop=stop, stream=True)
    chunks = list(s)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completions_endpoint_batch_of_prompts_and_echo(client, model, tok):
    r = client.completions.create(model="tiny", prompt=["Hello", "The quick"], max_tokens=12, temperature=0, echo=True)
    assert [c.text for c in r.choices] == [p + greedy_reference(model, tok, p, 12) for p in ("Hello", "The quick")]
    s = list(client.completions.create(model="tiny", prompt="Hello", max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in s) == greedy_reference(model, tok, "Hello", 12)


# ---------------------------------------------------------------------- tool calls
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two integers.", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}]
ASK = [{"role": "user", "content": "What is 2 + 3?"}]
CALL = '<tool_call>[{"name": "add", "arguments": {"a": 2, "b": 3}}]</tool_call>'


@pytest.fixture(scope="module")
def tool_server(tok):
    """A tiny model trained for a few seconds to answer the tool prompt with a call: real generation, real parsing."""
    m = train_to_call(tok, ASK, TOOLS, CALL)
    with running_server(m, tok, "tiny-tools") as (url, app):
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_tool_call_plain_and_streaming(tool_server):
    r = tool_server.chat.completions.create(model="tiny-tools", messages=ASK, tools=TOOLS, temperature=0, max_tokens=60)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None
    (call,) = ch.message.tool_calls
    assert call.type == "function" and call.function.name == "add"
    assert json.loads(call.function.arguments) == {"a": 2, "b": 3}
    chunks = list(tool_server.chat.completions.create(model="tiny-tools", messages=ASK, tools=TOOLS, temperature=0,
                                                      max_tokens=60, stream=True))
    assert all(not (c.choices[0].delta.content or "") for c in chunks)  # the call text is never shown as content
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(d.function.name, json.loads(d.function.arguments)) for d in deltas] == [("add", {"a": 2, "b": 3})]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the second turn (assistant tool call + tool result) renders and generates
    follow = ASK + [ch.message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": "5"}]
    r2 = tool_server.chat.completions.create(model="tiny-tools", messages=follow, tools=TOOLS, temperature=0, max_tokens=5)
    assert r2.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # tool_choice="none" turns tools off: the model's reply is then plain text
    r3 = tool_server.chat.completions.create(model="tiny-tools", messages=ASK, tools=TOOLS, tool_choice="none",
                                             temperature=0, max_tokens=20)
    assert r3.choices[0].message.tool_calls is None


def test_metrics_prometheus_text(server, client):
    client.chat.completions.create(model="tiny", messages=MSG, max_tokens=3, temperature=0)
    text = httpx.get(server[0] + "/metrics").text
    values = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert line.split()[1] == "TYPE" and line.split()[3] in ("counter", "gauge", "summary")
            continue
        name, v = line.rsplit(" ", 1)
        values[name] = float(v)
    assert values["llmkit_generation_tokens_total"] >= 3 and values["llmkit_decode_steps_total"] >= 2
    assert values['llmkit_http_requests_total{path="/v1/chat/completions",status="200"}'] >= 1


def test_cli_serves_a_checkpoint_dir(tmp_path, model, tok):
    """`llmkit serve DIR` end to end in a subprocess: loads the checkpoint, binds loopback, answers, and
    the demo's serve_command names this very command line."""
    import os
    import subprocess
    import sys
    import time

    from llmkit.infer.server import serve_command
    from llmkit.interop import save_checkpoint
    from serve_util import free_port

    save_checkpoint(tmp_path / "ckpt", model, tok)
    port = free_port()
    cmd = serve_command(str(tmp_path / "ckpt"), port=port).splitlines()[0].split()
    assert cmd[:4] == [".venv/bin/python", "-m", "llmkit", "serve"] and f"http://127.0.0.1:{port}/" in serve_command("x", port)
    env = {**os.environ, "LLMKIT_API_KEY": "k"}
    proc = subprocess.Popen([sys.executable] + cmd[1:] + ["--threads", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t0 = time.time()
        while time.time() - t0 < 60:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        r = c.chat.completions.create(model="ckpt", messages=MSG, max_tokens=8, temperature=0)
        assert r.choices[0].message.content == greedy_reference(model, tok, render_chat(tok, MSG, None), 8)
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401  # key from LLMKIT_API_KEY
    finally:
        proc.terminate()
        proc.wait(20)


def test_cli_reports_a_missing_model(capsys):
    from llmkit.infer.server import main

    assert main(["/no/such/model"]) == 2
    assert "no such file" in capsys.readouterr().err
