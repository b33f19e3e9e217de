"""Layers of survey §4.2.2 against torch and transformers references (checklist C6, C8, C9, C12)."""
import math

import pytest
import torch
import torch.nn.functional as F

from llmkit.model import ModelConfig
from llmkit.model.config import rope_inv_freq
from llmkit.model.layers import MLP, Norm, Rotary, alibi_bias, alibi_slopes, apply_rope, t5_bucket


def test_layernorm_matches_torch():
    x = torch.randn(3, 5, 16)
    ours = Norm(16, "layernorm", eps=1e-5)
    ours.weight.data.normal_(); ours.bias.data.normal_()
    ref = torch.nn.LayerNorm(16, eps=1e-5)
    ref.load_state_dict({"weight": ours.weight.data, "bias": ours.bias.data})
    assert torch.allclose(ours(x), ref(x), atol=1e-6)


def test_rmsnorm_matches_torch_and_unit_rms():
    x = torch.randn(3, 5, 16) * 3
    ours = Norm(16, "rmsnorm", eps=1e-6)
    ref = torch.nn.RMSNorm(16, eps=1e-6)
    assert torch.allclose(ours(x), ref(x), atol=1e-6)
    rms = ours(x).pow(2).mean(-1).sqrt()  # gamma = 1: RMS of the output is 1
    assert torch.allclose(rms, torch.ones_like(rms), atol=1e-4)


def test_rmsnorm_offset_is_gemma_one_plus_w():
    x = torch.randn(2, 8)
    n = Norm(8, "rmsnorm", eps=1e-6, offset=1.0)
    n.weight.data = torch.full((8,), 0.5)
    base = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.allclose(n(x), base * 1.5, atol=1e-6)


@pytest.mark.parametrize("act,fn", [
    ("relu", F.relu), ("gelu", F.gelu), ("silu", F.silu),
    ("gelu_tanh", lambda t: F.gelu(t, approximate="tanh")),
])
def test_plain_activations_match_functional(act, fn):
    cfg = ModelConfig(d_model=8, n_heads=2, activation=act, d_ff=16, mlp_bias=True)
    m = MLP(cfg)
    x = torch.randn(4, 8)
    assert torch.allclose(m(x), m.down(fn(m.up(x))), atol=1e-6)


@pytest.mark.parametrize("act,fn", [("swiglu", F.silu), ("geglu", F.gelu), ("reglu", F.relu)])
def test_glu_variants_three_matrices(act, fn):
    cfg = ModelConfig(d_model=8, n_heads=2, activation=act)
    m = MLP(cfg)
    x = torch.randn(4, 8)
    assert torch.allclose(m(x), m.down(fn(m.gate(x)) * m.up(x)), atol=1e-6)
    # GLU width ~ 2/3 * 4d keeps the parameter count of the 4d two-matrix MLP (Shazeer 2020)
    dense = ModelConfig(d_model=96, n_heads=2, activation="gelu")
    glu = ModelConfig(d_model=96, n_heads=2, activation=act)
    assert glu.d_ff == 256 and abs(3 * glu.d_ff - 2 * dense.d_ff) / (2 * dense.d_ff) < 0.01


def test_rope_relative_invariance_and_norm():
    cfg = ModelConfig(d_model=32, n_heads=2, pos="rope")
    rot = Rotary(cfg, 10000.0)
    q, k = torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16)
    pos = torch.arange(6)[None]
    qa, ka = apply_rope(q, *rot(pos)), apply_rope(k, *rot(pos))
    qb, kb = apply_rope(q, *rot(pos + 37)), apply_rope(k, *rot(pos + 37))
    assert torch.allclose(qa @ ka.transpose(-1, -2), qb @ kb.transpose(-1, -2), atol=1e-4)
    assert torch.allclose(qa.norm(dim=-1), q.norm(dim=-1), atol=1e-5)


def _hf_rope(kind, params, head_dim=16, max_pos=4096):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    c = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim, max_position_embeddings=max_pos,
                    rope_parameters={"rope_type": kind, "rope_theta": 10000.0, **params})
    return ROPE_INIT_FUNCTIONS[kind](c, "cpu")


@pytest.mark.parametrize("kind,params", [
    ("linear", {"factor": 4.0}),
    ("llama3", {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 512}),
    ("yarn", {"factor": 4.0, "original_max_position_embeddings": 512}),
])
def test_rope_scaling_matches_transformers(kind, params):
    ref_inv, ref_att = _hf_rope(kind, params)
    cfg = ModelConfig(d_model=32, n_heads=2, head_dim=16, max_seq_len=4096, rope_scaling={"type": kind, **params})
    inv, att = rope_inv_freq(cfg, 10000.0)
    assert torch.allclose(inv, ref_inv.float(), rtol=1e-5, atol=1e-7)
    assert att == pytest.approx(ref_att, rel=1e-6)


def test_rope_linear_interpolation_stays_in_trained_range_and_ntk_base_change():
    cfg = ModelConfig(d_model=32, n_heads=2, max_seq_len=512, rope_scaling={"type": "linear", "factor": 4.0})
    inv, _ = rope_inv_freq(cfg, 10000.0)
    base_inv, _ = rope_inv_freq(ModelConfig(d_model=32, n_heads=2), 10000.0)
    # position 2047 with factor 4 rotates like position 511.75 of the unscaled model: inside the trained range
    assert torch.allclose(2047 * inv, 511.75 * base_inv, rtol=1e-6)
    ntk = ModelConfig(d_model=32, n_heads=2, rope_scaling={"type": "ntk", "factor": 4.0})
    inv_ntk, _ = rope_inv_freq(ntk, 10000.0)
    d = 16
    new_base = 10000.0 * 4.0 ** (d / (d - 2))
    assert torch.allclose(inv_ntk, 1.0 / new_base ** (torch.arange(0, d, 2).double() / d).float(), rtol=1e-6)


def test_alibi_slopes_powers_of_two_and_bias():
    s = alibi_slopes(8)
    assert torch.allclose(s, torch.tensor([2 ** (-8 * (i + 1) / 8) for i in range(8)]))
    b = alibi_bias(s, torch.arange(5)[None], torch.arange(5)[None])
    assert torch.allclose(b[0, 3, 4, 1], -s[3] * 3)


@pytest.mark.parametrize("heads", [8, 12])
def test_alibi_matches_bloom(heads):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    ref = build_alibi_tensor(torch.ones(1, 10), heads, torch.float32)  # [H, 1, T]: slope * key position
    ours = alibi_slopes(heads)
    assert torch.allclose(ref[:, 0, 1], ours, atol=1e-7)


def test_t5_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-300, 300)[None, :]
    for bidir in (True, False):
        ref = T5Attention._relative_position_bucket(rel, bidirectional=bidir, num_buckets=32, max_distance=128)
        assert torch.equal(t5_bucket(rel, bidir, 32, 128), ref)
