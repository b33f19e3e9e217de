"""Reference helpers for the adaptation tests: a tiny random transformers Llama and the same weights in llmkit."""
from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llmkit.model.config import ModelConfig  # noqa: E402
from llmkit.model.transformer import Transformer  # noqa: E402

VOCAB = 96


def hf_llama(seed: int = 0, vocab: int = VOCAB, tie: bool = False):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tie,
                                   pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return transformers.LlamaForCausalLM(cfg).eval()


def llmkit_from_hf(hf) -> Transformer:
    """Same weights in llmkit's Transformer (the mapping the interop HF importer also uses)."""
    c = hf.config
    cfg = ModelConfig(vocab_size=c.vocab_size, d_model=c.hidden_size, n_layers=c.num_hidden_layers,
                      n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads, d_ff=c.intermediate_size,
                      max_seq_len=c.max_position_embeddings, norm_eps=c.rms_norm_eps, rope_theta=10000.0,
                      tie_embeddings=c.tie_word_embeddings, pad_token_id=0, eos_token_id=1, bos_token_id=2, family="llama")
    model = Transformer(cfg).eval()
    sd = hf.state_dict()
    ours = {"embed.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
    if not cfg.tie_embeddings:
        ours["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        ours[f"layers.{i}.attn_norm.weight"] = sd[p + "input_layernorm.weight"]
        ours[f"layers.{i}.mlp_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        for a, b in [("attn.q", "self_attn.q_proj"), ("attn.k", "self_attn.k_proj"), ("attn.v", "self_attn.v_proj"),
                     ("attn.o", "self_attn.o_proj"), ("mlp.gate", "mlp.gate_proj"), ("mlp.up", "mlp.up_proj"),
                     ("mlp.down", "mlp.down_proj")]:
            ours[f"layers.{i}.{a}.weight"] = sd[p + b + ".weight"]
    missing, unexpected = model.load_state_dict(ours, strict=False)
    assert not unexpected and all("rope" in m or "inv_freq" in m for m in missing), (missing, unexpected)
    return model


def hf_tokenizer(vocab: int = VOCAB):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t3"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="t0", eos_token="t1", bos_token="t2",
                                                unk_token="t3")


