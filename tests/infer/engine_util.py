"""Helpers for the engine tests: tiny random models and a small byte-level BPE tokenizer (multi-byte
characters span several tokens, so UTF-8 safety of streaming is exercised)."""
from __future__ import annotations

import pytest
import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers, trainers

from llmkit.model import ModelConfig, Transformer
from llmkit.tokenizer import Tokenizer

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["The quick brown fox jumps over the lazy dog. Hello world, how are you today?",
          "héllo wörld — naïve café 世界 🙂 ünïcödé", "0123456789 + - * / = ( ) [ ] { } < > : , ."] * 4

BASE = dict(vocab_size=300, d_model=32, n_layers=2, n_heads=4, max_seq_len=256)
ARCHS = {
    "llama_gqa": dict(n_kv_heads=2),
    "mqa_tied": dict(n_kv_heads=1, tie_embeddings=True),
    "alibi": dict(pos="alibi", norm="layernorm"),
    "t5bias": dict(pos="t5"),
    "learned_gelu": dict(pos="learned", norm="layernorm", activation="gelu_tanh", qkv_bias=True, mlp_bias=True),
    "window_local_global": dict(sliding_window=4, layer_types=["local", "global"], rope_local_theta=100.0),
    "mistral_window": dict(sliding_window=5, n_kv_heads=2),
    "gemma2_softcap": dict(norm_position="sandwich", qk_norm=True, attn_softcap=30.0, logit_softcap=20.0,
                           norm_offset=1.0, embed_scale=5.0),
    "parallel": dict(parallel_block=True),
    "moe": dict(n_experts=4, moe_top_k=2),
}


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine an OpenMP barrier
    waiting for a descheduled thread makes every op 10-20x slower; restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(arch: str = "llama_gqa", seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(**{**BASE, **ARCHS[arch], **kw})).eval()
    with torch.no_grad():  # sharper logits than the 0.02-std init, so sampled text is not uniform noise
        m.embed.weight.mul_(20)
    return m


def tiny_tokenizer() -> Tokenizer:
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(CORPUS, trainer)
    return Tokenizer(tk, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML)


def greedy_uncached(model, prompt: list[int], n: int) -> list[int]:
    """Reference: rerun the whole sequence without a cache at every step and take the argmax."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]
