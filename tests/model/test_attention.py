"""Attention variants and masks (checklist C2, C3, C10, C12)."""
import torch

from llmkit.model import ModelConfig, Transformer, build_mask
from llmkit.model.attention import Attention


def naive_attention(q, k, v, mask, scale):
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return s.softmax(-1) @ v


def test_sdpa_path_equals_naive_attention():
    cfg = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2)
    attn = Attention(cfg, 0)
    x = torch.randn(2, 7, 32)
    out = attn(x, is_causal=True)
    q = attn.q(x).view(2, 7, 4, 8).transpose(1, 2)
    k = attn.k(x).view(2, 7, 2, 8).transpose(1, 2).repeat_interleave(2, 1)
    v = attn.v(x).view(2, 7, 2, 8).transpose(1, 2).repeat_interleave(2, 1)
    mask = torch.ones(7, 7, dtype=torch.bool).tril()
    ref = attn.o(naive_attention(q, k, v, mask, 8 ** -0.5).transpose(1, 2).reshape(2, 7, 32))
    assert torch.allclose(out, ref, atol=1e-5)


def test_gqa_with_replicated_kv_equals_mha_and_cache_shrinks():
    torch.manual_seed(1)
    mha_cfg = ModelConfig(vocab_size=40, d_model=32, n_layers=1, n_heads=4, n_kv_heads=4, pos="rope")
    gqa_cfg = ModelConfig(vocab_size=40, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, pos="rope")
    gqa = Transformer(gqa_cfg)
    mha = Transformer(mha_cfg)
    sd = gqa.state_dict()
    for name in ("k", "v"):  # each kv head serves 2 query heads: MHA with those heads copied
        w = sd[f"layers.0.attn.{name}.weight"].view(2, 8, 32)
        sd[f"layers.0.attn.{name}.weight"] = w.repeat_interleave(2, 0).reshape(32, 32)
    mha.load_state_dict(sd)
    ids = torch.randint(0, 40, (2, 9))
    assert torch.allclose(gqa(ids), mha(ids), atol=1e-5)
    assert gqa.new_cache(1, 16).k[0].numel() * 2 == mha.new_cache(1, 16).k[0].numel()


def test_masks_causal_prefix_window_padding():
    q = torch.arange(6)
    m = build_mask(q, q)[0, 0]
    assert torch.equal(m, torch.ones(6, 6, dtype=torch.bool).tril())
    p = build_mask(q, q, prefix_len=torch.tensor([3]))[0, 0]
    assert p[:3, :3].all() and not p[2, 3:].any() and p[5, :6].all()
    w = build_mask(q, q, window=2)[0, 0]
    assert w.sum(-1).tolist() == [1, 2, 2, 2, 2, 2]  # each query sees itself and one earlier token
    valid = torch.tensor([[False, False, True, True, True, True]])
    pad = build_mask(q, q, key_valid=valid)[0, 0]
    assert not pad[4, :2].any() and pad[4, 2:5].all()
    assert pad[0, 0]  # a padding row sees itself (keeps SDPA finite)


def _causality_configs():
    base = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4)
    return [
        dict(base), dict(base, pos="alibi"), dict(base, pos="t5"), dict(base, pos="learned", norm="layernorm"),
        dict(base, pos="sinusoidal"), dict(base, n_kv_heads=1), dict(base, sliding_window=3),
        dict(base, norm_position="sandwich", qk_norm=True, attn_softcap=20.0),
        dict(base, parallel_block=True), dict(base, norm_position="post", deepnorm=True),
        dict(base, n_experts=4, moe_top_k=2),
    ]


def test_causal_decoder_future_tokens_do_not_leak():
    for kw in _causality_configs():
        m = Transformer(ModelConfig(**kw)).eval()
        ids = torch.randint(0, 50, (1, 10))
        ids2 = ids.clone()
        ids2[0, 6:] = (ids2[0, 6:] + 7) % 50
        a, b = m(ids), m(ids2)
        assert (a[0, :6] - b[0, :6]).abs().max() < 1e-6, kw
        assert (a[0, 6:] - b[0, 6:]).abs().max() > 1e-4, kw


def test_prefix_decoder_bidirectional_prefix_causal_target():
    m = Transformer(ModelConfig(arch="prefix_decoder", vocab_size=50, d_model=32, n_layers=2, n_heads=4)).eval()
    ids = torch.randint(0, 50, (1, 10))
    base = m(ids, prefix_len=4)
    changed_prefix = ids.clone(); changed_prefix[0, 3] = (ids[0, 3] + 1) % 50
    out = m(changed_prefix, prefix_len=4)
    assert ((out[0] - base[0]).abs().amax(-1) > 1e-5).all()  # a prefix change reaches every position
    changed_target = ids.clone(); changed_target[0, 7] = (ids[0, 7] + 1) % 50
    out = m(changed_target, prefix_len=4)
    assert (out[0, :7] - base[0, :7]).abs().max() < 1e-6  # a target change reaches neither prefix nor earlier targets
