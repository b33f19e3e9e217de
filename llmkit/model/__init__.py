"""Model architectures of survey §4.2: `ModelConfig` and one `Transformer`."""
from .attention import KVCache, build_mask
from .config import ConfigError, ModelConfig, list_presets
from .transformer import Transformer

__all__ = ["ModelConfig", "ConfigError", "Transformer", "KVCache", "build_mask", "list_presets"]
