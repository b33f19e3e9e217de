"""llmkit.infer: generation engine of survey §4.2.4 (decoding strategies, KV cache, speculative decoding,
weight-only quantisation, fused decode path) plus the OpenAI-compatible server (server.py, batcher.py).

Imports are lazy-light: `from llmkit.infer import generate, GenerationConfig`.
"""
from .engine import Completion, generate, sequence_logprob, stream_generate
from .sampling import GenerationConfig, sample_next

__all__ = ["Completion", "GenerationConfig", "generate", "sample_next", "sequence_logprob", "stream_generate"]
