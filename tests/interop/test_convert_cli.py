"""`llmkit convert` between the three formats; each output reloads to the same logits."""
from __future__ import annotations

import json
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

import llmkit  # noqa: E402
from llmkit.interop.cli import main  # noqa: E402


@pytest.fixture()
def hf_src(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      intermediate_size=48, tie_word_embeddings=False)
    torch.manual_seed(0)
    m = Qwen2ForCausalLM(cfg).eval()
    m.save_pretrained(tmp_path / "src")
    return tmp_path / "src", m


@torch.no_grad()
def test_convert_hf_to_llmkit_to_hf_and_gguf(hf_src, tmp_path, capsys):
    src, ref = hf_src
    ids = torch.arange(12)[None] % 64
    want = ref(ids).logits
    assert main([str(src), "--to", "llmkit", "--out", str(tmp_path / "ck")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "qwen2" and (tmp_path / "ck" / "manifest.json").exists()
    m, _ = llmkit.load(tmp_path / "ck")
    assert (m(ids) - want).abs().max() < 1e-4
    assert main([str(tmp_path / "ck"), "--to", "hf", "--out", str(tmp_path / "hf2")]) == 0
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf2").eval()
    assert (back(ids).logits - want).abs().max() < 1e-4
    # qwen2 (q/k/v biases, unpermuted q/k) goes out as a qwen2 GGUF that transformers reads back
    capsys.readouterr()
    assert main([str(src), "--to", "gguf", "--out", str(tmp_path / "q.gguf")]) == 0
    g = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", dtype=torch.float32).eval()
    assert (g(ids).logits - want).abs().max() < 1e-4
    m2, _ = llmkit.load(tmp_path / "q.gguf")
    assert m2.cfg.family == "qwen2" and (m2(ids) - want).abs().max() < 1e-4
    # a gpt2 model is not llama-shaped: a clear refusal, exit code 2
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32)).save_pretrained(tmp_path / "g2")
    assert main([str(tmp_path / "g2"), "--to", "gguf", "--out", str(tmp_path / "g2.gguf")]) == 2
    assert "llama architecture" in capsys.readouterr().err


def test_convert_bad_source(tmp_path, capsys):
    assert main([str(tmp_path / "missing"), "--to", "hf", "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
