"""Fixtures for the trainer tests: tiny models, an in-memory token stream and its loaders."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from llmkit.data.shards import BatchLoader, TokenDataset
from llmkit.model.config import ModelConfig
from llmkit.model.transformer import Transformer
from llmkit.train.config import TrainConfig

# On a loaded 2-core box, 2 OpenMP threads per process can be 10x slower than 1; CI may raise it.
torch.set_num_threads(int(os.environ.get("LLMKIT_TEST_THREADS", "1")))


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=128)
    base.update(kw)
    return ModelConfig(**base)


def tiny_model(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_cfg(**kw))


class DDPLike(torch.nn.Module):
    """A wrapper with DDP's shape (`.module`, a delegating forward, no forwarded attributes), without a process
    group: what `objectives.lm_loss` sees of a DDP-wrapped model."""

    def __init__(self, model):
        super().__init__()
        self.module = model

    def forward(self, *a, **kw):
        return self.module(*a, **kw)


def pattern_tokens(n: int = 20000, vocab: int = 64, seed: int = 0, eos: int | None = None) -> np.ndarray:
    """A learnable stream: short random 'words' from a fixed lexicon, so the loss can fall well below ln V."""
    rng = np.random.default_rng(seed)
    lexicon = [rng.integers(1, vocab - 8, size=rng.integers(3, 7)) for _ in range(24)]
    out = []
    while len(out) < n:
        out.extend(lexicon[rng.integers(len(lexicon))].tolist())
        if eos is not None and rng.random() < 0.1:
            out.append(eos)
    return np.asarray(out[:n], dtype=np.uint16)


def loaders(batch: int, seq: int, n: int = 20000, seed: int = 0, eos: int = 63, doc_info: bool = False):
    ds = TokenDataset(arrays=[pattern_tokens(n, eos=eos)], eos_id=eos)
    train, val = ds.split(0.1)
    return (BatchLoader(train, batch, seq, seed=seed, doc_info=doc_info),
            BatchLoader(val, batch, seq, seed=seed + 1, doc_info=doc_info))


def train_cfg(**kw) -> TrainConfig:
    base = dict(max_steps=10, micro_batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, log_every=1,
                progress=False, tensorboard=False, eval_batches=2)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def tiny():
    return tiny_model
