"""llmkit.interop: models in and out of the formats people use (HF directories, GGUF, llmkit checkpoints).

- `load(spec)` (loading.py): a llmkit checkpoint dir, an HF model dir, a .gguf file or an alias -> (Transformer, Tokenizer);
- `save_checkpoint` / `load_checkpoint` (checkpoint.py): the llmkit checkpoint directory;
- hf.py: HF config <-> ModelConfig and weight names for llama, mistral, qwen2, gemma, gemma2, gemma3, gpt2;
- gguf_io.py: GGUF read (dequantisation, tokenizer, chat template) and write;
- cli.py: `llmkit convert`.
"""


class LoadError(ValueError):
    """A model file or directory that cannot be loaded; the message names the file and the problem."""


from .checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from .loading import load  # noqa: E402

__all__ = ["LoadError", "load", "save_checkpoint", "load_checkpoint"]
