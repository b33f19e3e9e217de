"""`LM` over any OpenAI-compatible HTTP endpoint (survey §7 evaluation of API-only models, §8).

Implements `OpenAILM(base_url, model, api_key=None, chat=False)`:
- `generate`: POST /completions (or /chat/completions with chat=True) with max_tokens, temperature, top_p,
  stop and seed — the OpenAI argument names;
- `loglikelihood` / `loglikelihood_rolling`: the legacy completions trick lm-eval's `local-completions` uses —
  `echo=true, logprobs=1, max_tokens=1` returns per-token log-probs of the prompt itself; tokens whose
  `text_offset` lies at or after the context's end make up the continuation. Servers that do not return
  prompt log-probs (the OpenAI chat API, llmkit serve today) get a clear error instead of wrong numbers.
A `client` (any httpx.Client, e.g. FastAPI's TestClient) can be passed in place of a network connection.
"""
from __future__ import annotations

import os
from typing import Sequence

from .lm import LM, cut_at_stop


class OpenAILM(LM):
    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, chat: bool = False,
                 client=None, timeout: float = 120.0, batch: int = 16):
        import httpx

        self.base_url, self.model, self.chat, self.batch = base_url.rstrip("/"), model, chat, batch
        self.name = model
        key = api_key or os.environ.get("OPENAI_API_KEY")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = client or httpx.Client(timeout=timeout)

    def _post(self, path: str, body: dict) -> dict:
        r = self.client.post(f"{self.base_url}{path}", json=body, headers=self.headers)
        if r.status_code != 200:
            raise RuntimeError(f"{self.base_url}{path}: HTTP {r.status_code}: {r.text[:300]}")
        return r.json()

    def generate(self, prompts, *, max_new_tokens=64, temperature=0.0, top_p=1.0, stop=None, seed=0):
        out = []
        stop = list(stop or [])[:4]  # the OpenAI API takes at most 4 stop strings; the rest are cut locally
        for i, p in enumerate(prompts):
            body = {"model": self.model, "max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                    "seed": seed + i}
            if stop:
                body["stop"] = stop
            if self.chat:
                body["messages"] = [{"role": "user", "content": p}]
                text = self._post("/chat/completions", body)["choices"][0]["message"]["content"] or ""
            else:
                body["prompt"] = p
                text = self._post("/completions", body)["choices"][0]["text"]
            out.append(cut_at_stop(text, stop)[0])
        return out

    def _echo(self, texts: Sequence[str]) -> list[dict]:
        if self.chat:
            raise RuntimeError("log-likelihoods need the completions endpoint with echo+logprobs; use chat=False")
        res = []
        for i in range(0, len(texts), self.batch):
            body = {"model": self.model, "prompt": list(texts[i:i + self.batch]), "max_tokens": 1, "echo": True,
                    "logprobs": 1, "temperature": 0.0}
            try:
                choices = sorted(self._post("/completions", body)["choices"], key=lambda c: c["index"])
            except RuntimeError as e:
                raise RuntimeError(f"{e}\nlog-likelihood tasks need a server that returns prompt log-probs "
                                   "(echo+logprobs: vLLM, llama.cpp); use generation tasks with this one") from None
            for c in choices:
                lp = c.get("logprobs")
                if not lp or not lp.get("token_logprobs") or not lp.get("text_offset"):
                    raise RuntimeError(f"{self.base_url}: the server returned no prompt log-probs (echo+logprobs); "
                                       "log-likelihood tasks need a server that supports them (vLLM, llama.cpp)")
                res.append(lp)
        return res

    def loglikelihood(self, requests):
        out = []
        for (ctx, cont), lp in zip(requests, self._echo([c + x for c, x in requests])):
            total, greedy = 0.0, True
            for j, off in enumerate(lp["text_offset"]):
                # prompt tokens from the context's end on; the one generated token lies past the prompt
                if off < len(ctx) or off >= len(ctx + cont) or lp["token_logprobs"][j] is None:
                    continue
                total += lp["token_logprobs"][j]
                top = (lp.get("top_logprobs") or [None] * (j + 1))[j]
                if top:
                    greedy &= max(top, key=top.get) == lp["tokens"][j]
            out.append((total, greedy))
        return out

    def loglikelihood_rolling(self, texts):
        out = []
        for text, lp in zip(texts, self._echo(texts)):
            # the first token has no log-prob; the generated one lies past the text
            vals = [v for v, off in zip(lp["token_logprobs"], lp["text_offset"]) if v is not None and off < len(text)]
            out.append((float(sum(vals)), len(vals)))
        return out
