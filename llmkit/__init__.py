"""llmkit: the whole LLM lifecycle of "A Survey of Large Language Models" (Zhao et al., 2023) in one toolkit."""
__version__ = "0.1.0"


def load(spec, **kwargs):
    """Load `(model, tokenizer)` from a llmkit checkpoint dir, an HF dir, a .gguf file or an alias."""
    from .interop.loading import load as _load

    return _load(spec, **kwargs)
