"""HF directories: every family built tiny in transformers, imported (logits within 1e-4), exported and reloaded by transformers."""
from __future__ import annotations

import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

import llmkit  # noqa: E402
from llmkit.interop.hf import save_hf  # noqa: E402

SMALL = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, max_position_embeddings=64)


def _configs():
    T = transformers
    yield "llama", T.LlamaConfig(**SMALL, tie_word_embeddings=False, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}), T.LlamaForCausalLM
    yield "mistral", T.MistralConfig(**SMALL, sliding_window=4, head_dim=24), T.MistralForCausalLM
    yield "qwen2", T.Qwen2Config(**SMALL, tie_word_embeddings=True), T.Qwen2ForCausalLM
    yield "gemma", T.GemmaConfig(**SMALL, head_dim=16), T.GemmaForCausalLM
    yield "gemma2", T.Gemma2Config(**SMALL, head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
                                   attn_logit_softcapping=5.0, final_logit_softcapping=3.0), T.Gemma2ForCausalLM
    yield "gemma3_text", T.Gemma3TextConfig(**{**SMALL, "num_hidden_layers": 3}, head_dim=16, sliding_window=4,
                                            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                                                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}), T.Gemma3ForCausalLM
    yield "gpt2", T.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64), T.GPT2LMHeadModel


CASES = list(_configs())


def _reference(cfg, cls):
    torch.manual_seed(0)
    cfg._attn_implementation = "eager"
    model = cls(cfg).eval()
    with torch.no_grad():  # random everything, norms included (Gemma's start at zero, biases at zero)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("family,hf_cfg,cls", CASES, ids=[c[0] for c in CASES])
@torch.no_grad()
def test_import_and_export_match_transformers(family, hf_cfg, cls, tmp_path):
    ref = _reference(hf_cfg, cls)
    src = tmp_path / "hf"
    ref.save_pretrained(src)
    model, _ = llmkit.load(src)
    assert model.cfg.family == family
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))  # longer than the sliding windows
    want = ref(ids).logits
    assert (model(ids) - want).abs().max().item() < 1e-4

    out = save_hf(tmp_path / "export", model)
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(back) is cls
    assert (back(ids).logits - want).abs().max().item() < 1e-4


@torch.no_grad()
def test_sharded_safetensors(tmp_path):
    _, cfg, cls = CASES[0]
    ref = _reference(cfg, cls)
    ref.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    model, _ = llmkit.load(tmp_path)
    ids = torch.arange(12)[None] % 96
    assert (model(ids) - ref(ids).logits).abs().max().item() < 1e-4


@torch.no_grad()
def test_bfloat16_load(tmp_path):
    _, cfg, cls = CASES[2]
    _reference(cfg, cls).save_pretrained(tmp_path)
    model, _ = llmkit.load(tmp_path, dtype="bfloat16")
    assert model.embed.weight.dtype == torch.bfloat16
    assert model(torch.arange(8)[None]).dtype == torch.bfloat16


def test_export_refuses_what_hf_cannot_express(tmp_path):
    from llmkit.model.config import ModelConfig
    from llmkit.model.transformer import Transformer

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, qk_norm=True, pos="alibi", family="llama")
    with pytest.raises(ValueError, match=r"cannot be written as an HF llama directory: .*qk_norm=True.*pos='alibi'"):
        save_hf(tmp_path, Transformer(cfg))
    glm = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, block_pos=True, family="llama")
    with pytest.raises(ValueError, match=r"cannot be written as an HF llama directory: block_pos=True"):
        save_hf(tmp_path, Transformer(glm))
