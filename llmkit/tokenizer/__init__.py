"""llmkit.tokenizer (survey §4.1.3): the `Tokenizer` wrapper and chat templates (core.py)."""
from .core import Tokenizer

__all__ = ["Tokenizer"]
