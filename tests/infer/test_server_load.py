"""Load on loopback: 64 concurrent streaming clients x 4 requests each, zero errors, every stream well-formed."""
import asyncio
import json
import time

import httpx
import pytest
import torch

from serve_util import one_torch_thread, running_server, tiny_model, tiny_tokenizer  # noqa: F401

CLIENTS, PER_CLIENT, MAX_TOKENS = 64, 4, 12


def check_stream(lines: list[str], n_tokens_max: int) -> str:
    """Asserts the SSE stream is OpenAI-shaped; returns the text."""
    data = [ln[len("data: "):] for ln in lines if ln.startswith("data: ")]
    assert all(ln.startswith("data: ") or ln == "" for ln in lines), lines[:3]
    assert data[-1] == "[DONE]" and "[DONE]" not in data[:-1]
    chunks = [json.loads(d) for d in data[:-1]]
    assert all("error" not in c for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    reasons = [c["choices"][0]["finish_reason"] for c in chunks]
    assert reasons[-1] in ("stop", "length") and all(r is None for r in reasons[:-1])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert len(chunks) - 2 <= n_tokens_max
    return text


async def client(url: str, k: int, errors: list, texts: list):
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        for j in range(PER_CLIENT):
            body = {"model": "tiny", "stream": True, "max_tokens": MAX_TOKENS, "temperature": 0,
                    "messages": [{"role": "user", "content": f"client {k} request {j}"}]}
            try:
                async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        errors.append((k, j, r.status_code, await r.aread()))
                        continue
                    lines = [ln async for ln in r.aiter_lines()]
                texts.append(((k, j), check_stream(lines, MAX_TOKENS)))
            except Exception as e:  # noqa: BLE001 - every failure is counted
                errors.append((k, j, repr(e)))


def test_64_concurrent_streaming_clients():
    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    with running_server(tiny_model(tok), tok, "tiny", max_batch=32) as (url, app):
        errors, texts = [], []

        async def main():
            await asyncio.gather(*(client(url, k, errors, texts) for k in range(CLIENTS)))

        t0 = time.time()
        asyncio.run(main())
        elapsed = time.time() - t0
        stats = app.state.server.batcher.stats
        assert errors == [], errors[:5]
        assert len(texts) == CLIENTS * PER_CLIENT
        assert elapsed < 120, f"load test took {elapsed:.0f}s"
        assert stats["max_rows"] >= 16 and stats["batched_steps"] > 0.8 * stats["steps"]
        assert app.state.server.inflight == 0 and app.state.server.batcher.running == 0
        # greedy: the same prompt gives the same text whatever the batch it ran in
        again = httpx.post(url + "/v1/chat/completions", timeout=30, json={
            "model": "tiny", "max_tokens": MAX_TOKENS, "temperature": 0,
            "messages": [{"role": "user", "content": "client 5 request 2"}]}).json()
        assert again["choices"][0]["message"]["content"] == dict(texts)[(5, 2)]
