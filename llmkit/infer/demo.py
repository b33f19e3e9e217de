"""The inference part of `make demo` (survey §4.2.4, §8): a short scripted chat, streamed, then a decode figure.

`run_chat_demo(model, tokenizer)` plays a 3-turn conversation through the model's chat template (each
answer streamed to stdout as it is generated, the history carried from turn to turn), then times greedy
decoding of 64 tokens and returns the figures. The model is used as given: pass one prepared with
`cli.load_for_inference(..., quantize=...)` to demo the fused / quantised paths.
"""
from __future__ import annotations

import sys
import time

from .engine import generate
from .sampling import GenerationConfig

TURNS = [
    "Hi! In one sentence, what is a large language model?",
    "Give me three short tips for writing clear code.",
    "Thanks. Summarise your previous answer in five words.",
]


def run_chat_demo(model, tokenizer, turns: list[str] | None = None, max_new_tokens: int = 80, out=None) -> dict:
    """Stream a scripted multi-turn chat; return {"turns": [...], "decode_tok_per_s": float}."""
    out = out or sys.stdout
    history: list[dict] = []
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, repetition_penalty=1.1)
    answers = []
    for user in turns or TURNS:
        history.append({"role": "user", "content": user})
        print(f"\nuser> {user}\nassistant> ", end="", file=out, flush=True)
        prompt = tokenizer.apply_chat_template(history, add_generation_prompt=True)
        reply = generate(model, tokenizer, prompt, cfg, add_special_tokens=False,
                         stream=lambda i, d: print(d, end="", file=out, flush=True))
        print(file=out, flush=True)
        history.append({"role": "assistant", "content": reply.text})
        answers.append(reply.text)
    n = 64
    bench_cfg = GenerationConfig(max_new_tokens=n, temperature=0.0, eos_token_id=[])  # fixed length: no EOS
    prompt = tokenizer.apply_chat_template(history[:1], add_generation_prompt=True)
    t = time.perf_counter()
    generate(model, tokenizer, prompt, bench_cfg, add_special_tokens=False)
    rate = n / (time.perf_counter() - t)
    print(f"\ndecode: {rate:.1f} tokens/s (batch 1, greedy, {n} tokens, prefill included)", file=out, flush=True)
    return {"turns": answers, "decode_tok_per_s": rate}
