"""Tiny llmkit model + byte-level BPE tokenizer shared by the eval and prompting tests (imported as eval_util)."""
from __future__ import annotations

import os

import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers, trainers

from llmkit.model.config import ModelConfig
from llmkit.model.transformer import Transformer
from llmkit.tokenizer import Tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "Question: What is 2 + 3?\nAnswer: 5",
    "A man is sitting on a roof. He starts pulling up roofing.", "def add(a, b):\n    return a + b\n",
    "The answer is 42. #### 42", "Paris is the capital of France.", "heads tails flip coin",
]


def tiny_tokenizer() -> Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 5, trainer)
    return Tokenizer(tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def tiny_model(vocab: int, seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    args = dict(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
                activation="swiglu") | kw
    cfg = ModelConfig(**args)
    return Transformer(cfg).eval()
