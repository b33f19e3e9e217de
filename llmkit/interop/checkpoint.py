"""The llmkit checkpoint directory (DESIGN.md artifacts): config.json, model.safetensors, tokenizer.json, manifest.json.

Implements:
- `save_checkpoint(dir, model, tokenizer, parents, config)`: every file written atomically, manifest last
  (lineage: parents by content hash, the producing config, code version, command);
- `load_checkpoint(dir)` -> (Transformer, Tokenizer | None);
- `read_safetensors(path)` and `build_model(cfg, state, source)`: the safe reading shared by every importer —
  safetensors only (a pickle is refused, never unpickled), and a `LoadError` naming the file for a missing or
  truncated file, a missing / unexpected tensor or a shape mismatch.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from ..artifacts import atomic_write_bytes, atomic_write_json, write_manifest
from ..model.config import ConfigError, ModelConfig
from ..model.transformer import Transformer
from ..tokenizer import Tokenizer
from . import LoadError

PICKLE_NAMES = ("pytorch_model.bin", "model.bin", "model.pt", "model.pth", "consolidated.00.pth")


def to_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype {dtype!r} is unknown; use one of {sorted(names)}")
    return names[dtype]


def refuse_pickles(directory: Path) -> None:
    for name in PICKLE_NAMES:
        if (directory / name).exists():
            raise LoadError(f"{directory / name}: a pickle checkpoint; llmkit never unpickles (it can run code). "
                            "Convert it to safetensors first (e.g. transformers `save_pretrained(..., safe_serialization=True)`)")
    raise LoadError(f"{directory}: no model.safetensors (or model.safetensors.index.json) found")


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise LoadError(f"{path}: file is missing")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:2] in (b"PK", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):  # torch.save zip / raw pickle
        raise LoadError(f"{path}: this is a pickle (torch.save) file, not safetensors; llmkit never unpickles it. "
                        "Re-save the weights with safetensors")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise LoadError(f"{path}: truncated or corrupt safetensors ({e}); re-download or re-save it") from None


@contextlib.contextmanager
def skip_init():
    """Random initialisation is wasted work when every weight is loaded next (transformers' `no_init_weights`)."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_", "trunc_normal_", "xavier_uniform_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda t, *a, **k: t)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], source: str | Path, dtype=None, device="cpu") -> Transformer:
    """A Transformer holding exactly `state` (every tensor present, none extra, shapes equal)."""
    with skip_init():
        model = Transformer(cfg)
    want = model.state_dict()
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    if missing or extra:
        raise LoadError(f"{source}: weights do not fit the config: missing {missing[:6]}{'...' if len(missing) > 6 else ''}, "
                        f"unexpected {extra[:6]}{'...' if len(extra) > 6 else ''}")
    for k, v in want.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise LoadError(f"{source}: shape mismatch for {k}: file has {tuple(state[k].shape)}, config expects {tuple(v.shape)}")
    model.load_state_dict(state, strict=True, assign=True)  # adopt the loaded tensors, no second copy
    model.eval()
    return model.to(device=device, dtype=to_dtype(dtype) or torch.float32)


def save_checkpoint(directory: str | Path, model: Transformer, tokenizer: Tokenizer | None = None, parents=(),
                    config=None, command: list[str] | None = None) -> Path:
    """Write a llmkit checkpoint directory; returns it. `config` is the producing run's config (recorded in the manifest)."""
    from safetensors.torch import save

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_json(d / "config.json", model.cfg.to_dict())
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write_bytes(d / "model.safetensors", save(state, metadata={"format": "pt", "producer": "llmkit"}))
    if tokenizer is not None:
        tokenizer.save(d)
    write_manifest(d, "checkpoint", parents=list(parents), config=config, command=command)
    return d


def load_checkpoint(directory: str | Path, dtype=None, device="cpu") -> tuple[Transformer, Tokenizer | None]:
    d = Path(directory)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise LoadError(f"{cfg_path}: missing; a llmkit checkpoint needs config.json, model.safetensors, tokenizer.json")
    try:
        cfg = ModelConfig.from_dict(json.loads(cfg_path.read_text()))
    except (json.JSONDecodeError, ConfigError, TypeError) as e:
        raise LoadError(f"{cfg_path}: not a valid llmkit ModelConfig ({e})") from None
    if not (d / "model.safetensors").exists():
        refuse_pickles(d)
    model = build_model(cfg, read_safetensors(d / "model.safetensors"), d / "model.safetensors", dtype, device)
    tok = Tokenizer.load(d) if (d / "tokenizer.json").exists() else None
    return model, tok
