"""`llmkit generate` and `llmkit chat`: the engine from the command line (survey §4.2.4, §8 "using LLMs").

Implements:
- `generate_main`: one or more prompts (batched), plain or through the model's chat template,
  streamed to stdout or returned as JSON with token counts and decode speed;
- `chat_main`: an interactive, streaming, multi-turn chat on stdin/stdout (`/reset` forgets the
  conversation, `/quit` or end of input leaves), usable through a pipe;
- `load_for_inference`: `llmkit.load` + dtype + optional int8/int4 weight quantisation + thread count.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from .engine import generate
from .sampling import GenerationConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FALLBACK_TEMPLATE = "{role}: {content}\n"  # for tokenizers without a chat template: "user: ...\nassistant:"


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="llmkit checkpoint dir, Hugging Face dir, .gguf file or alias (smollm2-135m-instruct)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="weights and activations (default float32)")
    p.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantisation for CPU decoding")
    p.add_argument("--group-size", type=int, default=32, help="int4 group size (32, 64, 128, 256)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--draft", help="a smaller model with the same tokenizer, for speculative decoding")
    p.add_argument("--no-fast", dest="fast", action="store_false", help="use the model's forward, not the fused path")


def add_sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature})")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, help="seed for sampling (reproducible output)")


def gen_config(a: argparse.Namespace) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                            min_p=a.min_p, repetition_penalty=a.repetition_penalty, num_beams=a.num_beams,
                            stop=a.stop, seed=a.seed)


def load_for_inference(spec: str, dtype: str = "float32", quantize: str | None = None, group_size: int = 32,
                       threads: int | None = None, fast: bool = True):
    """(model, tokenizer) in eval mode, in `dtype` or quantised (int8/int4 weights, bfloat16 activations).

    fast: attach the fused decode path (fused.py) when the architecture allows it.
    """
    import llmkit

    from .fused import enable_fast_decode
    from .quant import quantize_model

    if threads:
        torch.set_num_threads(threads)
    model, tok = llmkit.load(spec)
    model.eval()
    if not quantize and dtype != "float32":
        model.to(DTYPES[dtype])
    if fast:
        enable_fast_decode(model, quantize, group_size)
    elif quantize:
        quantize_model(model, quantize, group_size=group_size)
    return model, tok


def render_chat(tok, messages: list[dict]) -> str:
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(messages, add_generation_prompt=True)
    return "".join(FALLBACK_TEMPLATE.format(**m) for m in messages) + "assistant:"


def generate_main(argv: list[str]) -> int:
    """llmkit generate MODEL --prompt TEXT [...]: complete prompts (several --prompt run as one batch)."""
    p = argparse.ArgumentParser(prog="llmkit generate", description=generate_main.__doc__)
    add_model_args(p)
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable: one batch)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    p.add_argument("--system", help="system message (with --chat)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt instead of streaming text")
    add_sampling_args(p, temperature=0.0)
    a = p.parse_args(argv)
    model, tok = load_for_inference(a.model, a.dtype, a.quantize, a.group_size, a.threads, a.fast)
    draft = load_for_inference(a.draft, a.dtype, a.quantize, a.group_size, fast=a.fast)[0] if a.draft else None
    prompts = a.prompt
    if a.chat:
        sys_msg = [{"role": "system", "content": a.system}] if a.system else []
        prompts = [render_chat(tok, sys_msg + [{"role": "user", "content": x}]) for x in prompts]
    cfg = gen_config(a)
    stream_one = not a.json and len(prompts) == 1
    t0 = time.perf_counter()
    outs = generate(model, tok, prompts, cfg, add_special_tokens=not a.chat, draft_model=draft,
                    stream=(lambda i, d: print(d, end="", flush=True)) if stream_one else None)
    dt = time.perf_counter() - t0
    if a.json:
        for o in outs:
            print(json.dumps({"text": o.text, "finish_reason": o.finish_reason, "prompt_tokens": o.prompt_tokens,
                              "completion_tokens": len(o.token_ids), "seconds": round(dt, 3),
                              "tokens_per_second": round(sum(len(x.token_ids) for x in outs) / dt, 2)},
                             ensure_ascii=False))
    elif stream_one:
        print()
    else:
        for i, o in enumerate(outs):
            print(f"--- [{i}] {o.finish_reason}\n{o.text}")
    return 0


def chat_main(argv: list[str]) -> int:
    """llmkit chat MODEL: interactive streaming chat; /reset clears the conversation, /quit leaves."""
    p = argparse.ArgumentParser(prog="llmkit chat", description=chat_main.__doc__)
    add_model_args(p)
    p.add_argument("--system", help="system message")
    add_sampling_args(p, temperature=0.7)
    a = p.parse_args(argv)
    model, tok = load_for_inference(a.model, a.dtype, a.quantize, a.group_size, a.threads, a.fast)
    draft = load_for_inference(a.draft, a.dtype, a.quantize, a.group_size, fast=a.fast)[0] if a.draft else None
    cfg = gen_config(a)
    system = [{"role": "system", "content": a.system}] if a.system else []
    history: list[dict] = []
    interactive = sys.stdin.isatty()
    if interactive:
        print("llmkit chat: type a message; /reset forgets the conversation, /quit leaves.", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line:  # end of input
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            history = []
            print("[conversation reset]", flush=True)
            continue
        history.append({"role": "user", "content": line})
        out = generate(model, tok, render_chat(tok, system + history), cfg, add_special_tokens=False,
                       draft_model=draft, stream=lambda i, d: print(d, end="", flush=True))
        print(flush=True)
        history.append({"role": "assistant", "content": out.text})
    return 0
