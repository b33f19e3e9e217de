"""Streaming pieces of the OpenAI-compatible server (`server.py`, survey §4.2.4).

Implements:
- `Detok`: incremental detokenization (a sliding window, so a long reply costs O(n) decodes);
- stop strings: where a stop string starts, and how much text is safe to send before a stop string
  could still complete (`_find_stop`, `_safe_len`);
- `Completion`: one request's choices (n x prompts) run concurrently and shaped into OpenAI
  `chat.completion` / `text_completion` objects or their SSE chunks, tool calls included;
- `release_once`: the request's concurrency slots are returned exactly once, however the stream ends.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid

from .server_schema import APIError
from .tools_call import parse_tool_calls


class Detok:
    """Incremental detokenization: decode only a short window so a long reply costs O(n), not O(n^2).

    Text is released once it no longer ends in a partial UTF-8 character ("\ufffd"); the window
    starts a few tokens back so that tokenizers which change a word's spacing by context stay right.
    """

    def __init__(self, tok):
        self.tok, self.ids, self.prefix, self.read = tok, [], 0, 0

    @property
    def n(self) -> int:
        return len(self.ids)

    def add(self, tok_id: int) -> str:
        self.ids.append(tok_id)
        return self.flush(final=False)

    def flush(self, final: bool = True) -> str:
        """New text since the last call; `final` also releases a trailing partial character."""
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        now = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(now) <= len(before) or (now.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before):]


def _find_stop(text: str, stop: list[str]) -> int | None:
    hits = [text.find(s) for s in stop if s in text]
    return min(hits) if hits else None


def _safe_len(text: str, stop: list[str]) -> int:
    """How much of `text` may be sent: hold back a trailing partial character or partial stop string."""
    n = len(text) - 1 if text.endswith("\ufffd") else len(text)
    for s in stop:
        for k in range(min(len(s) - 1, n), 0, -1):
            if text[:n].endswith(s[:k]):
                n = min(n, len(text[:n]) - k)
                break
    return n


async def _merge(gens):
    """Interleave several async generators; yields (index, item). Closing it cancels them all."""
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i, g):
        try:
            async for item in g:
                await q.put((i, item))
            await q.put((i, None))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            await q.put((i, e))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        left = len(tasks)
        while left:
            i, item = await q.get()
            if isinstance(item, Exception):
                raise item
            if item is None:
                left -= 1
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


def _sse(obj) -> str:
    return "data: " + json.dumps(obj, separators=(",", ":")) + "\n\n"


class Completion:
    """One request's choices: runs them through `Server.generate` and shapes OpenAI responses/chunks."""

    def __init__(self, srv, chat: bool, body, prompts: list[list[int]], tools, texts=None):
        self.srv, self.chat, self.body, self.tools, self.texts = srv, chat, body, tools, texts
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.jobs = [(p, srv.sampling(body, len(p), i)) for p in prompts for i in range(body.n)]
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.completion_tokens = 0

    def gens(self):
        return [self.srv.generate(ids, cfg, self.body.stop or [], bool(self.tools)) for ids, cfg in self.jobs]

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": int(time.time()), "model": self.srv.model_id}

    def _usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def _finish(self, text: str, reason: str):
        """(content, tool_calls, finish_reason) of a finished choice."""
        content, calls = parse_tool_calls(text, self.tools)
        return content, calls, ("tool_calls" if calls else reason)

    async def full(self) -> dict:
        choices = {}
        async for i, (_, reason, n, text) in _merge(self.gens()):
            if reason is not None:
                self.completion_tokens += n
                choices[i] = self._choice(i, text, reason)
        out = self._base("chat.completion" if self.chat else "text_completion")
        return {**out, "choices": [choices[i] for i in sorted(choices)], "usage": self._usage()}

    def _choice(self, i: int, text: str, reason: str) -> dict:
        if not self.chat:
            prefix = self.texts[i // self.body.n] if self.body.echo else ""
            return {"index": i, "text": prefix + text, "logprobs": None, "finish_reason": reason}
        content, calls, reason = self._finish(text, reason)
        msg = {"role": "assistant", "content": content if (content or not calls) else None}
        if calls:
            msg["tool_calls"] = calls
        return {"index": i, "message": msg, "logprobs": None, "finish_reason": reason}

    def _chunk(self, i: int, delta, reason=None) -> str:
        base = self._base("chat.completion.chunk" if self.chat else "text_completion")
        c = {"index": i, "delta": delta} if self.chat else {"index": i, "text": delta, "logprobs": None}
        return _sse({**base, "choices": [{**c, "finish_reason": reason}]})

    async def stream(self):
        try:
            if self.chat:
                for i in range(len(self.jobs)):
                    yield self._chunk(i, {"role": "assistant", "content": ""})
            elif self.body.echo:
                for i in range(len(self.jobs)):
                    yield self._chunk(i, self.texts[i // self.body.n])
            async for i, (delta, reason, n, text) in _merge(self.gens()):
                if reason is None:
                    yield self._chunk(i, {"content": delta} if self.chat else delta)
                    continue
                self.completion_tokens += n
                if self.chat and self.tools:
                    _, calls, reason = self._finish(text, reason)
                    if calls:  # held-back text was the call itself: send it as tool_calls, not content
                        yield self._chunk(i, {"tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]})
                        delta = ""
                if delta:
                    yield self._chunk(i, {"content": delta} if self.chat else delta)
                yield self._chunk(i, {} if self.chat else "", reason)
            if self.body.stream_options and self.body.stream_options.include_usage:
                yield _sse({**self._base("chat.completion.chunk" if self.chat else "text_completion"),
                            "choices": [], "usage": self._usage()})
            yield "data: [DONE]\n\n"
        except APIError as e:
            yield _sse(e.body)
        finally:
            release_once(self.srv, self)


def release_once(srv, job: "Completion") -> None:
    if not getattr(job, "released", False):
        job.released = True
        srv.release(len(job.jobs))
