"""The Transformer as a whole: caches, padding, presets, parameter counts, MoE, training signal (C1-C11)."""
import pytest
import torch
import torch.nn.functional as F

from llmkit.model import ConfigError, ModelConfig, Transformer, list_presets
from llmkit.model.moe import MoE

BASE = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4)
VARIANTS = {
    "llama": dict(n_kv_heads=2),
    "mqa": dict(n_kv_heads=1),
    "alibi": dict(pos="alibi", norm="layernorm"),
    "t5bias": dict(pos="t5"),
    "learned_gelu": dict(pos="learned", norm="layernorm", activation="gelu_tanh", qkv_bias=True, attn_out_bias=True, mlp_bias=True),
    "sinusoidal_relu": dict(pos="sinusoidal", activation="relu"),
    "sandwich_softcap": dict(norm_position="sandwich", qk_norm=True, attn_softcap=30.0, logit_softcap=20.0, norm_offset=1.0, embed_scale=5.0),
    "post_deepnorm": dict(norm_position="post", deepnorm=True, norm="layernorm"),
    "post_ln": dict(norm_position="post", norm="layernorm"),
    "parallel": dict(parallel_block=True, tie_embeddings=True),
    "window_local_global": dict(sliding_window=3, layer_types=["local", "global"], rope_local_theta=100.0, rope_theta=1e4),
    "rope_yarn": dict(rope_scaling={"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}),
    "partial_rope": dict(rope_fraction=0.5),
    "moe": dict(n_experts=4, moe_top_k=2),
    "geglu_qwen": dict(activation="geglu", qkv_bias=True),
    "glm_2d_positions": dict(block_pos=True, arch="prefix_decoder"),  # (no block positions given: row 0 everywhere)
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_kv_cache_equals_uncached(name):
    m = Transformer(ModelConfig(**BASE, **VARIANTS[name])).eval()
    ids = torch.randint(0, 50, (2, 11))
    full = m(ids)
    cache = m.new_cache(2, 16)
    parts = [m(ids[:, :5], cache=cache), m(ids[:, 5:6], cache=cache), m(ids[:, 6:9], cache=cache), m(ids[:, 9:], cache=cache)]
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["llama", "alibi", "window_local_global", "learned_gelu", "t5bias"])
def test_left_padded_batch_equals_one_by_one(name):
    m = Transformer(ModelConfig(**BASE, **VARIANTS[name])).eval()
    a, b = torch.randint(0, 50, (1, 8)), torch.randint(0, 50, (1, 5))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    valid = torch.ones(2, 8, dtype=torch.bool); valid[1, :3] = False
    pos = (valid.cumsum(-1) - 1).clamp(min=0)
    # ALiBi / T5 biases use slot distances, which equal position distances under left padding
    out = m(ids, attn_mask=valid, positions=pos)
    assert (out[0] - m(a)[0]).abs().max() < 1e-5
    assert (out[1, 3:] - m(b)[0]).abs().max() < 1e-5
    # and one decode step on top of the padded cache
    cache = m.new_cache(2, 12)
    m(ids, attn_mask=valid, positions=pos, cache=cache)
    nxt = torch.randint(0, 50, (2, 1))
    step = m(nxt, attn_mask=torch.cat([valid, torch.ones(2, 1, dtype=torch.bool)], 1), positions=pos[:, -1:] + 1, cache=cache)
    assert (step[1, 0] - m(torch.cat([b, nxt[1:]], 1))[0, -1]).abs().max() < 1e-5


def test_preset_parameter_counts_match_formula():
    for name in list_presets():
        cfg = ModelConfig.preset(name)
        if cfg.num_params() > 3e6:
            continue  # the big shapes are checked by formula against published sizes below
        assert sum(p.numel() for p in Transformer(cfg).parameters()) == cfg.num_params(), name
    assert round(ModelConfig.preset("gpt2").num_params() / 1e6, 1) == 124.4  # GPT-2 small
    assert round(ModelConfig.preset("smollm2-135m").num_params() / 1e6, 1) == 134.5  # SmolLM2-135M
    assert round(ModelConfig.preset("llama-1b").num_params() / 1e9, 2) == 1.24  # Llama 3.2 1B


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_parameter_count_formula(name):
    cfg = ModelConfig(**BASE, **VARIANTS[name])
    assert sum(p.numel() for p in Transformer(cfg).parameters()) == cfg.num_params()


def test_bias_switch_changes_count_by_formula():
    no = ModelConfig(**BASE, norm="layernorm", norm_bias=False, activation="gelu")
    yes = ModelConfig(**BASE, norm="layernorm", qkv_bias=True, attn_out_bias=True, mlp_bias=True, activation="gelu")
    d, f, L = 32, 128, 2
    per_layer = (3 * d) + d + (f + d) + 2 * d  # qkv, out, mlp up+down biases, two LayerNorm biases
    assert yes.num_params() - no.num_params() == L * per_layer + d  # + final norm bias


def _train_steps(cfg, steps=40, lr=3e-3, **fwd):
    torch.manual_seed(0)
    m = Transformer(cfg)
    opt = torch.optim.AdamW(m.parameters(), lr=lr)
    ids = torch.randint(0, cfg.vocab_size, (4, 17))
    losses = []
    for _ in range(steps):
        extra = {"encoder_input_ids": ids[:, :8]} if cfg.arch == "encoder_decoder" else {}
        logits = m(ids[:, :-1], **extra)
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1)) + m.aux_loss()
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_option_trains(name):
    losses = _train_steps(ModelConfig(**BASE, **VARIANTS[name]))
    assert losses[-1] < 0.6 * losses[0], (name, losses[0], losses[-1])


@pytest.mark.parametrize("name", [n for n in list_presets() if n.startswith("t3-")])
def test_table3_presets_train(name):
    cfg = ModelConfig.preset(name, vocab_size=64, d_model=64, max_seq_len=64)
    losses = _train_steps(cfg, steps=30)
    assert losses[-1] < 0.7 * losses[0], (name, losses[0], losses[-1])


def test_moe_identical_experts_equal_dense_and_routing_stats():
    cfg = ModelConfig(**BASE, n_experts=4, moe_top_k=2)
    moe = MoE(cfg)
    for e in moe.experts[1:]:
        e.load_state_dict(moe.experts[0].state_dict())
    x = torch.randn(3, 5, 32)
    assert torch.allclose(moe(x), moe.experts[0](x), atol=1e-5)
    assert int(moe.counts.sum()) == 15 * 2  # every token goes to k experts without a capacity
    # Switch aux loss E * sum f_i P_i: exactly 1 for uniform router probabilities, larger when skewed
    torch.nn.init.zeros_(moe.router.weight)
    moe(x)
    assert moe.aux_loss.item() == pytest.approx(1.0, abs=1e-6)
    moe.router.weight.data[0] = 5.0 * torch.sign(x.reshape(-1, 32).mean(0))
    moe(x)
    assert moe.aux_loss.item() > 1.0


def test_moe_capacity_drops_tokens():
    cfg = ModelConfig(**BASE, n_experts=4, moe_top_k=1, moe_capacity_factor=1.0)
    moe = MoE(cfg)
    torch.nn.init.zeros_(moe.router.weight)
    moe.router.weight.data[0] = 1.0  # positive inputs: every token picks expert 0; only `capacity` get through
    x = torch.rand(1, 16, 32) + 0.1
    out = moe(x)
    assert int(moe.counts[0]) == 4 and (out.reshape(16, 32)[4:] == 0).all()


def test_deepnorm_constants_and_residual_formula():
    cfg = ModelConfig(**BASE, norm_position="post", deepnorm=True, norm="layernorm")
    assert cfg.deepnorm_alpha == pytest.approx((2 * 2) ** 0.25) and cfg.deepnorm_beta == pytest.approx((8 * 2) ** -0.25)
    m = Transformer(cfg).eval()
    blk = m.layers[0]
    x = torch.randn(1, 4, 32)
    ctx = dict(rope=m._rope(torch.arange(4)[None])["global"], mask=None, bias=None, cache=None, is_causal=True)
    h = blk.attn_norm(cfg.deepnorm_alpha * x + blk.attn(x, rope=ctx["rope"], is_causal=True))
    expect = blk.mlp_norm(cfg.deepnorm_alpha * h + blk.mlp(h))
    assert torch.allclose(blk(x, ctx), expect, atol=1e-6)


def test_embedding_gradient_shrink_is_exact():
    grads = []
    for a in (1.0, 0.1):
        torch.manual_seed(0)
        m = Transformer(ModelConfig(**BASE, embed_grad_scale=a))
        m(torch.arange(6)[None]).sum().backward()
        grads.append(m.embed.weight.grad.clone())
    assert torch.allclose(grads[1], 0.1 * grads[0], atol=1e-6)


def test_encoder_decoder_cross_attention_and_cache():
    cfg = ModelConfig(arch="encoder_decoder", pos="t5", **BASE)
    m = Transformer(cfg).eval()
    src, tgt = torch.randint(0, 50, (2, 7)), torch.randint(0, 50, (2, 6))
    full = m(tgt, encoder_input_ids=src)
    src2 = src.clone(); src2[:, -1] = (src2[:, -1] + 1) % 50
    assert (m(tgt, encoder_input_ids=src2) - full).abs().amax(-1).min() > 1e-6  # the encoder is bidirectional
    cache = m.new_cache(2, 8)
    steps = [m(tgt[:, i:i + 1], encoder_input_ids=src, cache=cache) for i in range(6)]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5


@pytest.mark.slow
def test_encoder_decoder_learns_to_reverse():
    """C1: a tiny encoder-decoder learns sequence reversal to > 95% token accuracy."""
    torch.manual_seed(0)
    V, L = 16, 6
    cfg = ModelConfig(arch="encoder_decoder", vocab_size=V + 1, d_model=64, n_layers=2, n_heads=4, pos="learned",
                      max_seq_len=16, activation="relu")
    m = Transformer(cfg)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    bos = V
    for _ in range(500):
        src = torch.randint(0, V, (64, L))
        tgt = src.flip(1)
        dec_in = torch.cat([torch.full((64, 1), bos), tgt[:, :-1]], 1)
        loss = F.cross_entropy(m(dec_in, encoder_input_ids=src).reshape(-1, V + 1), tgt.reshape(-1))
        opt.zero_grad(); loss.backward(); opt.step()
    src = torch.randint(0, V, (256, L))
    dec_in = torch.cat([torch.full((256, 1), bos), src.flip(1)[:, :-1]], 1)
    acc = (m(dec_in, encoder_input_ids=src).argmax(-1) == src.flip(1)).float().mean().item()
    assert acc > 0.95, acc


def test_bfloat16_forward():
    m = Transformer(ModelConfig(**BASE)).to(torch.bfloat16)
    out = m(torch.randint(0, 50, (1, 5)))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("bad,msg", [
    (dict(norm="batchnorm"), "norm="), (dict(n_kv_heads=3), "multiple of n_kv_heads"),
    (dict(layer_types=["local", "global"]), "sliding_window"), (dict(deepnorm=True), "Post-LN"),
    (dict(pos="alibi", arch="encoder_decoder"), "alibi"),
    (dict(block_pos=True, arch="encoder_decoder", pos="t5"), "block_pos .* decoder-only"),
])
def test_config_errors_say_what_to_change(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        ModelConfig(**{**BASE, **bad})
    with pytest.raises(ConfigError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({"d_modle": 3})
