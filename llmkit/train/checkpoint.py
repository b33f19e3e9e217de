"""Checkpoint and resume of survey §4.3.1 (E5): atomic, checksummed, resumable training state.

Layout of `RUN_DIR/checkpoints/step_NNNNNNN/` (the llmkit checkpoint layout plus training state):
- `config.json`, `model.safetensors`, `tokenizer.json` (when a tokenizer is known), `manifest.json`;
- `optimizer.safetensors` (every tensor of the optimiser state) + `optimizer.json` (param groups and
  non-tensor state), `rng.safetensors` (torch CPU/CUDA generator states), `trainer_state.json`
  (step, tokens, data-loader position, Python/NumPy RNG, spike-detector and loss-scaler state).
Nothing is pickled: tensors live in safetensors, everything else in JSON.

Atomicity: a checkpoint is written into `.tmp-step_N/`, every file fsynced, the manifest (sha256 of
every file) written last, then the directory is renamed into place. `latest_checkpoint` returns the
newest directory whose manifest verifies, so a crash at any moment leaves the previous one usable.
`keep_last` prunes older ones.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..artifacts import atomic_write_json, verify_manifest, write_manifest

PREFIX = "step_"


def ckpt_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


# ---------------------------------------------------------------------------------------------- model part
def save_model_dir(directory: Path, state: dict[str, torch.Tensor], model_config=None, tokenizer=None) -> None:
    """config.json + model.safetensors (+ tokenizer.json): the part any llmkit loader reads."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    if model_config is not None:
        atomic_write_json(directory / "config.json", model_config.to_dict())
    if tokenizer is not None:
        if hasattr(tokenizer, "save"):
            try:
                tokenizer.save(directory)  # llmkit Tokenizer: a directory
            except (IsADirectoryError, TypeError, AttributeError):
                tokenizer.save(str(directory / "tokenizer.json"))  # tokenizers.Tokenizer: a file path
        elif hasattr(tokenizer, "to_str"):
            (directory / "tokenizer.json").write_text(tokenizer.to_str())


# ---------------------------------------------------------------------------------------------- optimiser
def optimizer_to_files(opt) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer, or its state dict: keys are parameter indices, or parameter names (FQNs) when the
    state was gathered from sharded (FSDP2/TP) parameters by torch.distributed.checkpoint."""
    sd = opt.state_dict() if hasattr(opt, "state_dict") else opt
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{k}"] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    key_of = lambda idx: int(idx) if idx.isdigit() else idx  # noqa: E731  index, or a dotted parameter name
    for key, v in tensors.items():
        idx, name = key[len("state."):].rsplit(".", 1)
        state.setdefault(key_of(idx), {})[name] = v
    for key, v in meta["scalars"].items():
        idx, name = key.rsplit(".", 1)
        state.setdefault(key_of(idx), {})[name] = v
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------------------------------- RNG
def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    return tensors, {"python": [py[0], list(py[1]), py[2]],
                     "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))


# ---------------------------------------------------------------------------------------------- save / load
def save_checkpoint(ckpt_dir: Path, step: int, *, model_state: dict, optimizer, trainer_state: dict,
                    model_config=None, tokenizer=None, extra_config: dict | None = None, keep_last: int = 0) -> Path:
    """Write checkpoint `step` atomically into ckpt_dir; returns its final path."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / ckpt_name(step)
    tmp = ckpt_dir / f".tmp-{ckpt_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model_dir(tmp, model_state, model_config, tokenizer)
    opt_tensors, opt_meta = optimizer_to_files(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    atomic_write_json(tmp / "optimizer.json", opt_meta)
    rng_tensors, rng_meta = rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    atomic_write_json(tmp / "trainer_state.json", {**trainer_state, "rng": rng_meta, "step": step})
    for p in tmp.iterdir():  # safetensors does not fsync: do it before the rename makes the files visible
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    write_manifest(tmp, "checkpoint", config=extra_config, extra={"step": step})
    if final.exists():  # re-saving a step after a roll-back: move the old one aside first
        old = ckpt_dir / f".old-{ckpt_name(step)}-{os.getpid()}"
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(ckpt_dir)
    if keep_last:
        for p in list_checkpoints(ckpt_dir)[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)
    return final


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the rename is still atomic


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.exists():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint whose manifest checksums verify (a damaged one is skipped, with a warning)."""
    for p in reversed(list_checkpoints(ckpt_dir)):
        if not (p / "manifest.json").exists():
            continue
        bad = verify_manifest(p)
        if not bad:
            return p
        print(f"llmkit: checkpoint {p} fails its checksums ({bad}); using an older one", flush=True)
    return None


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """Read a checkpoint directory back: model/optimizer/rng tensors and the trainer state."""
    path = Path(path)
    for name in ("model.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors", "trainer_state.json"):
        if not (path / name).exists():
            raise FileNotFoundError(f"{path} is not a resumable llmkit checkpoint: {name} is missing")
    return {
        "model": load_file(str(path / "model.safetensors"), device=str(device)),
        "optimizer": optimizer_from_files(load_file(str(path / "optimizer.safetensors"), device=str(device)),
                                          json.loads((path / "optimizer.json").read_text())),
        "rng": load_file(str(path / "rng.safetensors")),
        "trainer_state": json.loads((path / "trainer_state.json").read_text()),
    }
