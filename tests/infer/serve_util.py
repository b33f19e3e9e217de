"""Helpers for the serving tests: a tiny byte-level BPE tokenizer with SmolLM2's ChatML template, a tiny
random Llama-style model, and a real uvicorn server on a free loopback port in a background thread."""
from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import pytest
import tokenizers
import torch
import uvicorn
from tokenizers import decoders, models, pre_tokenizers, trainers

from llmkit.infer.server import create_app
from llmkit.model import ModelConfig, Transformer
from llmkit.tokenizer import Tokenizer

# SmolLM2-Instruct's chat template (ChatML with a default system prompt), as in its tokenizer_config.json
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face. Hello, how are you today?",
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } < > \" ' : , .",
    'You are an expert in composing functions. <tools> <tool_call> {"name": "add", "arguments": {"a": 2}}',
    "system user assistant tool calculator expression function description parameters properties",
] * 4


def tiny_tokenizer() -> Tokenizer:
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(CORPUS, trainer)
    return Tokenizer(tk, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
                     chat_template=CHATML)


def tiny_model(tok: Tokenizer, seed: int = 0, max_seq_len: int = 1024, no_eos_when_greedy: bool = False) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      max_seq_len=max_seq_len, eos_token_id=tok.eos_token_id)
    m = Transformer(cfg).eval()
    if no_eos_when_greedy:
        # the special tokens get logit 0 while every real token's logit is a random +-; the greedy
        # choice then is never a special token, so a reply runs to max_tokens (for stop-button tests)
        with torch.no_grad():
            for t in SPECIALS:
                m.lm_head.weight[tok.token_to_id(t)] = 0
    return m


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(model, tok, model_id="tiny", **kw):
    """Serve `model` on 127.0.0.1:<free port>; yields the base URL ("http://127.0.0.1:PORT")."""
    app = create_app(model, tok, model_id, **kw)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=2))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    t0 = time.time()
    while not server.started:
        if time.time() - t0 > 20 or not th.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        th.join(timeout=10)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one intra-op thread; two spinning OpenMP threads on a busy 2-core
    machine made a 50-token forward ~300x slower in our measurements. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def train_to_call(tok: Tokenizer, messages: list[dict], tools: list[dict], reply: str, seed: int = 1) -> Transformer:
    """A tiny model trained (a few seconds) until its greedy reply to `messages` + `tools` is `reply`:
    real generation and real parsing downstream, with a known right answer."""
    from llmkit.infer.tools_call import render_chat

    m = tiny_model(tok, seed=seed).train()
    prompt = tok.encode(render_chat(tok, messages, tools))
    ids = torch.tensor([prompt + tok.encode(reply) + [tok.eos_token_id]])
    labels = ids[0, len(prompt):]
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(300):
        logits = m(ids[:, :-1])[0, len(prompt) - 1:]
        if (logits.argmax(-1) == labels).all():
            break
        loss = torch.nn.functional.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()
