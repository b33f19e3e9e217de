"""Fixtures for the eval tests; the tiny model and tokenizer builders live in eval_util.py."""
from __future__ import annotations

import pytest

from eval_util import CORPUS, tiny_model, tiny_tokenizer  # noqa: F401


@pytest.fixture(scope="session")
def tiny():
    tok = tiny_tokenizer()
    return tiny_model(tok.vocab_size), tok
