"""Bad requests get the right 4xx in OpenAI's error shape and the server keeps serving; API key; limits; 429."""
import json
import threading
import time

import httpx
import pytest
import torch

from llmkit.infer.server_schema import Limits
from serve_util import one_torch_thread, running_server, tiny_model, tiny_tokenizer  # noqa: F401

KEY = "s3cret-key"
OK = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def server():
    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    limits = Limits(max_prompt_tokens=200, max_tokens=800, max_n=4, max_concurrent=3, max_body_bytes=20_000)
    with running_server(tiny_model(tok, no_eos_when_greedy=True), tok, "tiny", api_key=KEY, limits=limits) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server[0], headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        yield c


def post(http, body, path="/v1/chat/completions", **kw):
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return http.post(path, content=content, headers={"Content-Type": "application/json", **kw.pop("headers", {})}, **kw)


def assert_error(r, status, param=None, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code


@pytest.mark.parametrize("body,param", [
    ("{not json", None),
    ('{"model": "tiny", "messages": [', None),
    ({**OK, "max_tokens": "ten"}, "max_tokens"),
    ({**OK, "temperature": "hot"}, "temperature"),
    ({**OK, "temperature": 3.5}, "temperature"),
    ({**OK, "top_p": 0}, "top_p"),
    ({**OK, "n": 0}, "n"),
    ({**OK, "messages": "hi"}, "messages"),
    ({**OK, "messages": []}, "messages"),
    ({**OK, "messages": [{"role": "wizard", "content": "x"}]}, None),
    ({**OK, "messages": [{"role": "user", "content": 5}]}, None),
    ({**OK, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({**OK, "stream": "yes"}, "stream"),
    ({k: v for k, v in OK.items() if k != "model"}, "model"),
    ([1, 2, 3], None),
    ({**OK, "frequency_penalty": 0.5}, "frequency_penalty"),
    ({**OK, "logprobs": True}, "logprobs"),
])
def test_malformed_requests_get_400(http, body, param):
    assert_error(post(http, body), 400, param)


def test_oversized_and_limits(http):
    long = " ".join(["hello"] * 400)
    assert_error(post(http, {**OK, "messages": [{"role": "user", "content": long}]}), 400, code="context_length_exceeded")
    assert_error(post(http, {**OK, "max_tokens": 801}), 400, "max_tokens")
    assert_error(post(http, {**OK, "n": 5}), 400, "n")
    assert_error(post(http, {**OK, "messages": [{"role": "user", "content": "x" * 30_000}]}), 413)
    assert_error(post(http, {"model": "tiny", "prompt": "hi " * 300}, "/v1/completions"), 400, code="context_length_exceeded")
    assert_error(post(http, {"model": "tiny", "prompt": ["hi"] * 5}, "/v1/completions"), 400, "prompt")

    def chunked():  # no Content-Length header: the server must stop reading at its limit
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"x" * 1000
        yield b'"}]}'

    assert_error(http.post("/v1/chat/completions", content=chunked(), headers={"Content-Type": "application/json"}), 413)


def test_unknown_model_is_404_and_never_loaded(http):
    for name in ("other", "/etc/passwd", "../../model.gguf", "smollm2-135m-instruct"):
        assert_error(post(http, {**OK, "model": name}), 404, "model", "model_not_found")


def test_api_key(server):
    url = server[0]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Bearer {KEY}x"}):
        assert_error(httpx.post(url + "/v1/chat/completions", json=OK, headers=headers), 401, code="invalid_api_key")
        assert_error(httpx.get(url + "/v1/models", headers=headers), 401)
    assert httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(url + "/v1/models", headers={"X-Api-Key": KEY}).status_code == 200
    assert httpx.get(url + "/health").status_code == 200  # liveness needs no key


def test_unknown_route_and_method_in_error_shape(http):
    assert_error(http.get("/v1/nothing"), 404)
    assert_error(http.get("/v1/chat/completions"), 405)


def test_concurrency_limit_gives_429_then_recovers(server, http):
    """max_concurrent=3: two long streams (n=1) and one n=2 request cannot all run; the extra is a 429."""
    long = {**OK, "max_tokens": 800, "stream": True}  # long enough to be running during the check
    opened, stop = [], threading.Event()

    def hold():
        with httpx.Client(base_url=server[0], headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
            with c.stream("POST", "/v1/chat/completions", json=long) as r:
                opened.append(r.status_code)
                for _ in r.iter_lines():
                    if stop.is_set():
                        break

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for t in threads:
        t.start()
    t0 = time.time()
    while len(opened) < 2 and time.time() - t0 < 10:
        time.sleep(0.01)
    try:
        assert opened == [200, 200]
        assert_error(post(http, {**OK, "n": 2}), 429, code="rate_limit_exceeded")
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    t0 = time.time()
    while server[1].state.server.inflight and time.time() - t0 < 10:
        time.sleep(0.02)
    assert server[1].state.server.inflight == 0  # closed streams gave their slots back
    r = post(http, {**OK, "n": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2


def test_server_keeps_serving_after_bad_requests(http):
    for body in ("{", {**OK, "max_tokens": -1}, {**OK, "model": "x"}):
        post(http, body)
    r = post(http, OK)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
    metrics = http.get("/metrics").text
    assert 'path="/v1/chat/completions",status="400"' in metrics


def test_client_disconnect_cancels_generation(server, http):
    st = server[1].state.server.batcher.stats
    before = st["cancelled"]
    with http.stream("POST", "/v1/chat/completions", json={**OK, "max_tokens": 64, "stream": True}) as r:
        for line in r.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                break  # close the connection after the first token
    t0 = time.time()
    while st["cancelled"] == before and time.time() - t0 < 10:
        time.sleep(0.02)
    assert st["cancelled"] == before + 1
