"""Fixtures for the adaptation tests (helpers live in adapt_ref.py)."""
from __future__ import annotations

import pytest
from adapt_ref import VOCAB, hf_llama, llmkit_from_hf

from llmkit.model.config import ModelConfig
from llmkit.model.transformer import Transformer


@pytest.fixture
def pair():
    hf = hf_llama()
    return hf, llmkit_from_hf(hf)


@pytest.fixture
def tiny():
    """A tiny llmkit decoder with random weights (no reference needed)."""
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
                      pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return Transformer(cfg)
