"""The training fast paths of the model give the same numbers as the plain ones (survey §4.3 efficiency)."""
import torch

from llmkit.model.layers import _rope, apply_rope


def test_rope_handwritten_backward_equals_autograd():
    g = torch.Generator().manual_seed(0)
    for rot in (16, 8):  # full and partial rotary
        f = torch.rand(32, rot // 2, generator=g, dtype=torch.float64) * 3
        emb = torch.cat([f, f], -1)[None, None]  # Rotary's layout: the same frequencies in both halves
        cos, sin = emb.cos(), emb.sin()
        x = torch.randn(2, 4, 32, 16, generator=g, dtype=torch.float64, requires_grad=True)
        up = torch.randn(2, 4, 32, 16, generator=g, dtype=torch.float64)
        fast = apply_rope(x, cos, sin)
        ref = _rope(x, cos, sin)
        torch.testing.assert_close(fast, ref)  # full rotation: x*C + swap(x)*S, equal to rounding
        (a,) = torch.autograd.grad((fast * up).sum(), x)
        (b,) = torch.autograd.grad((ref * up).sum(), x)
        torch.testing.assert_close(a, b)


def test_block_under_bf16_autocast_casts_norm_output_once_same_values():
    """Pre-norm outputs are cast to bf16 once per block; each Linear casting them itself gives the same values."""
    from llmkit.model import ModelConfig, Transformer
    from llmkit.model import transformer as T

    cfg = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, pos="rope",
                      activation="swiglu", norm="rmsnorm")
    torch.manual_seed(0)
    model = Transformer(cfg)
    x = torch.randint(0, 61, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = model(x)
    orig = T._autocast_input
    T._autocast_input = lambda h: h
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref = model(x)
    finally:
        T._autocast_input = orig
    torch.testing.assert_close(fast, ref, rtol=0, atol=0)
