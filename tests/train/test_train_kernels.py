"""The hand-written training kernels (causal attention, RMSNorm, RoPE, fused loss) equal torch's own ops
and leave the model's numbers unchanged (survey §4.3 efficiency)."""
import ctypes
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmkit.model import attention as A
from llmkit.model import layers as Lyr
from llmkit.model.attention import CausalAttention, native_causal_attention, use_causal_attention, use_native_attention
from llmkit.model.layers import Norm


def _qkv(B, H, KV, T, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # the [B, T, H, D] layout viewed as [B, H, T, D], as the projections produce it
    mk = lambda h: torch.randn(B, T, h, D, generator=g).transpose(1, 2).to(dtype).requires_grad_()
    return mk(H), mk(KV), mk(KV), torch.randn(B, H, T, D, generator=g).to(dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("kv", [4, 2, 1])  # MHA, GQA, MQA
def test_causal_attention_equals_sdpa(dtype, tol, kv):
    q, k, v, up = _qkv(2, 4, kv, 19, 8, dtype)
    scale = 0.3
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True, scale=scale,
                                         enable_gqa=kv != 4)
    ref_grads = torch.autograd.grad((ref * up.double()).sum(), (q, k, v))
    out = CausalAttention.apply(q, k, v, scale)
    grads = torch.autograd.grad((out * up).sum(), (q, k, v))
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    for a, b in zip((out, *grads), (ref, *ref_grads)):
        # relative to the tensor's scale: bf16 keeps 8 bits of mantissa
        err = (a.double() - b).abs().max() / b.abs().max()
        assert err < tol, err


def test_causal_attention_used_only_where_it_applies():
    q, k, v, _ = _qkv(1, 4, 2, 8, 8, torch.bfloat16)
    assert use_causal_attention(q, k, v)
    with torch.no_grad():
        assert not use_causal_attention(q, k, v)  # inference keeps SDPA
    assert not use_causal_attention(q.float(), k.float(), v.float())  # fp32: the native kernel instead
    assert not use_causal_attention(q, k[:, :, :4], v[:, :, :4])  # queries against a longer cache
    q2, k2, v2, _ = _qkv(1, 4, 1, 4096, 8, torch.bfloat16)  # 4 x 4096^2 saved scores: SDPA's O(T) memory wins
    assert not use_causal_attention(q2, k2, v2)


needs_native = pytest.mark.skipif(not use_native_attention(*_qkv(1, 2, 2, 4, 8, torch.float32)[:3]),
                                  reason="native extension (compiler + BLAS sgemm) unavailable")


@needs_native
@pytest.mark.parametrize("B,H,KV,T,D", [(2, 4, 4, 1, 8), (2, 4, 4, 19, 8), (1, 4, 2, 64, 16), (2, 6, 3, 70, 24),
                                        (1, 3, 1, 130, 64)])
def test_native_attention_equals_float64_sdpa(B, H, KV, T, D):
    """float32 values and gradients of the native kernel against SDPA in float64, as close as SDPA's own
    float32 result is: MHA/GQA/MQA, lengths below, at and across the 64-row blocks, head sizes off 16."""
    q, k, v, up = _qkv(B, H, KV, T, D, torch.float32, seed=T)
    scale = D**-0.5

    def run(fn, dtype):
        qq, kk, vv = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
        out = fn(qq, kk, vv)
        return (out, *torch.autograd.grad((out * up.to(dtype)).sum(), (qq, kk, vv)))

    sdpa = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True, scale=scale, enable_gqa=H != KV)
    ref = run(sdpa, torch.float64)
    fast = run(lambda a, b, c: native_causal_attention(a, b, c, scale), torch.float32)
    peer = run(sdpa, torch.float32)
    for a, r, p in zip(fast, ref, peer):
        assert a.dtype == torch.float32 and a.shape == r.shape
        err, peer_err = (a.double() - r).abs().max(), (p.double() - r).abs().max()
        assert err <= 4 * peer_err + 1e-6, (err, peer_err)


@needs_native
def test_native_attention_same_bits_with_and_without_gradients():
    q, k, v, _ = _qkv(2, 4, 2, 150, 32, torch.float32)
    with torch.no_grad():  # no probabilities kept: per-thread block buffers with the same row stride
        a = native_causal_attention(q, k, v, 0.2)
    assert torch.equal(a, native_causal_attention(q, k, v, 0.2))
    assert use_native_attention(q, k, v)
    with torch.no_grad():
        assert use_native_attention(q, k, v)  # the same kernel for inference: same bits
    assert not use_native_attention(q.double(), k.double(), v.double())
    assert not use_native_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert not use_native_attention(q, k[:, :, :4], v[:, :, :4])  # queries against a longer cache
    q2, k2, v2, _ = _qkv(1, 4, 1, 4096, 8, torch.float32)  # 4 x 4096^2 float32 scores: SDPA's O(T) memory
    assert not use_native_attention(q2, k2, v2)
    # the bound is in bytes: one head of 4096^2 float32 scores is exactly 64 MiB, two bf16 heads too
    assert use_native_attention(q2[:, :1], k2, v2)
    assert not use_native_attention(*_qkv(1, 1, 1, 4097, 8, torch.float32)[:3])  # one row over
    q3, k3, v3, _ = _qkv(1, 2, 1, 4096, 8, torch.bfloat16)
    assert use_causal_attention(q3, k3, v3) and not use_causal_attention(q2.bfloat16(), k2.bfloat16(), v2.bfloat16())


@needs_native
def test_native_attention_same_bits_on_any_thread_count():
    """Workers claim (batch, kv-head) tasks dynamically; each task's sums stay within one worker, so 1, 2 and 3
    threads give the same bits. The workers' BLAS is pinned to one thread inside and restored after: the
    calling thread (worker 0) keeps the MKL count torch gave it for its own matmuls."""
    q, k, v, up = _qkv(3, 4, 2, 90, 16, torch.float32, seed=3)
    before = torch.get_num_threads()
    lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
    set_local = getattr(lib, "MKL_Set_Num_Threads_Local", None)  # x86 wheels link MKL; returns the previous count
    runs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out = native_causal_attention(q, k, v, 0.25)
            runs.append((out, *torch.autograd.grad((out * up).sum(), (q, k, v))))
            if set_local is not None:  # torch.set_num_threads(n) set this thread's MKL count to n; still n
                assert set_local(n) == n
    finally:
        torch.set_num_threads(before)
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


@needs_native
@pytest.mark.slow
def test_native_attention_under_torch_compile():
    """A torch custom op: torch.compile keeps it whole (no graph break) with the same values and gradients."""
    q, k, v, up = _qkv(2, 4, 2, 40, 16, torch.float32)
    f = lambda a, b, c: (native_causal_attention(a, b, c, 0.25) * up).sum()
    compiled = torch.compile(f, fullgraph=True)
    a = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    b = torch.autograd.grad(f(q, k, v), (q, k, v))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


@pytest.mark.slow
def test_bf16_attention_under_torch_compile():
    """The bf16 CPU attention (an autograd.Function) under torch.compile: same values and gradients as eager, GQA
    included (compile refuses to save the grouped reshapes, so the Function saves its inputs there)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 24, 16, generator=g).to(torch.bfloat16).requires_grad_() for h in (4, 2, 2))
    up = torch.randn(2, 4, 24, 16, generator=g).to(torch.bfloat16)
    f = lambda a, b, c: (CausalAttention.apply(a, b, c, 0.25) * up).float().sum()
    a = torch.autograd.grad(torch.compile(f)(q, k, v), (q, k, v))
    b = torch.autograd.grad(f(q, k, v), (q, k, v))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_rmsnorm_grad_equals_autograd():
    g = torch.Generator().manual_seed(0)
    for offset in (0.0, 1.0):  # Llama and Gemma's (1 + w)
        norm = Norm(24, "rmsnorm", 1e-6, offset=offset)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(24, generator=g))
        x = torch.randn(3, 5, 24, generator=g, requires_grad=True)
        up = torch.randn(3, 5, 24, generator=g)
        fast = norm(x)
        ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (norm.weight + offset)
        torch.testing.assert_close(fast, ref)
        a = torch.autograd.grad((fast * up).sum(), (x, norm.weight))
        b = torch.autograd.grad((ref * up).sum(), (x, norm.weight))
        for u, w in zip(a, b):
            torch.testing.assert_close(u, w)
        with torch.no_grad():  # the inference path is the plain formula
            torch.testing.assert_close(norm(x), ref.detach())
    # bf16 activations (autocast): float32 arithmetic inside, bf16 out and bf16 input gradient
    xb = x.detach().bfloat16().requires_grad_()
    fast = norm(xb)
    assert fast.dtype == torch.bfloat16
    (gx,) = torch.autograd.grad((fast.float() * up).sum(), xb)
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (norm.weight + 1.0)
    (gr,) = torch.autograd.grad((ref * up).sum(), x)
    assert gx.dtype == torch.bfloat16
    torch.testing.assert_close(gx.float(), gr, rtol=2e-2, atol=2e-2)


def _plain_paths(monkeypatch):
    """Switch the model back to the library's generic ops: SDPA, autograd RMSNorm and RoPE."""
    monkeypatch.setattr(A, "use_causal_attention", lambda *a: False)
    monkeypatch.setattr(A, "use_native_attention", lambda *a: False)
    monkeypatch.setattr(Lyr, "fused_f32", lambda *a: None)

    def plain_norm(x, weight, eps, offset):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return (xf * (weight.float() + offset)).to(x.dtype)

    monkeypatch.setattr(Lyr._RMSNormGrad, "apply", plain_norm)
    monkeypatch.setattr(Lyr._RopeGrad, "apply", Lyr._rope)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_training_step_equals_plain_paths(dtype, monkeypatch):
    """Loss and every parameter gradient of one training step (GQA Llama-style model, fused loss) equal
    those of the generic ops; bf16 within bf16 rounding."""
    from llmkit.model import ModelConfig, Transformer
    from llmkit.train.objectives import lm_loss

    cfg = ModelConfig(vocab_size=101, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=32,
                      pos="rope", activation="swiglu", norm="rmsnorm")
    torch.manual_seed(0)
    model = Transformer(cfg)
    x = torch.randint(0, 101, (2, 33))
    batch = {"input_ids": x[:, :-1], "labels": x[:, 1:]}

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss, _ = lm_loss(model, batch)
            logits = model(batch["input_ids"])
        return loss, logits, torch.autograd.grad(loss, list(model.parameters()))

    fast = run()
    _plain_paths(monkeypatch)
    ref = run()
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == "fp32" else dict(rtol=0.05, atol=2e-3)
    torch.testing.assert_close(fast[0], ref[0], **tol)
    torch.testing.assert_close(fast[1].float(), ref[1].float(), **tol)
    for (name, _), a, b in zip(model.named_parameters(), fast[2], ref[2]):
        rel = (a - b).norm() / b.norm()
        assert rel < (1e-4 if dtype == "fp32" else 2e-2), (name, float(rel))


def test_fused_loss_chunks_equal_one_chunk():
    """Summing the weight gradient over several row chunks equals one chunk's (z-loss and ignored rows)."""
    from llmkit.train.fused_loss import linear_cross_entropy

    g = torch.Generator().manual_seed(3)
    h = torch.randn(70, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 16, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 40, (70,), generator=g)
    y[3:9] = -100
    one = torch.autograd.grad(linear_cross_entropy(h, w, y, 1e-3)[0], (h, w))
    many = torch.autograd.grad(linear_cross_entropy(h, w, y, 1e-3, chunk=16)[0], (h, w))  # 5 chunks, the last partial
    for a, b in zip(many, one):
        torch.testing.assert_close(a, b)


def test_fused_loss_bf16_confident_predictions():
    """When the target's probability is near 1 (a trained model), the bf16 path keeps p_target - 1 and the
    loss accurate: compared with float32 cross-entropy on the same bf16 logits."""
    from llmkit.train.fused_loss import linear_cross_entropy

    g = torch.Generator().manual_seed(4)
    w = torch.randn(500, 32, generator=g)
    y = torch.randint(0, 500, (96,), generator=g)
    h = (3 * w[y] + 0.1 * torch.randn(96, 32, generator=g)).requires_grad_()  # target logit far above the rest
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = h @ w.t()
        ref = F.cross_entropy(logits.float(), y)
        out, _ = linear_cross_entropy(h, w, y)
    assert ref < 0.05  # p_target ~ 0.95 and above
    gh_ref, = torch.autograd.grad(ref, h)
    gh, = torch.autograd.grad(out, h)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=1e-4)
    assert (gh - gh_ref).norm() / gh_ref.norm() < 2e-2


def test_bf16_training_step_takes_the_training_kernels(monkeypatch):
    """A bf16 Trainer step on CPU runs CausalAttention in every layer and the RMSNorm/RoPE Functions (RoPE on
    the bf16 projections; RMSNorm on the float32 residual stream)."""
    calls = {"attn": 0, "norm": 0, "rope": 0}
    monkeypatch.setattr(CausalAttention, "apply", _counting(calls, CausalAttention.apply, "attn"))
    monkeypatch.setattr(Lyr._RMSNormGrad, "apply", _counting(calls, Lyr._RMSNormGrad.apply, "norm"))
    # the residual stream stays float32 under autocast: its norms take the native float32 kernel
    monkeypatch.setattr(Lyr._NativeRMSNorm, "apply", _counting(calls, Lyr._NativeRMSNorm.apply, "norm"))
    monkeypatch.setattr(Lyr._RopeGrad, "apply", _counting(calls, Lyr._RopeGrad.apply, "rope"))
    _one_training_step("bf16")
    assert calls == {"attn": 3, "norm": 2 * 3 + 1, "rope": 2 * 3}


def _counting(calls, fn, key):
    def wrapped(*a, **kw):
        calls[key] += 1
        return fn(*a, **kw)
    return wrapped


def _one_training_step(dtype):
    """One Trainer step of a 3-layer GQA Llama-style model on CPU; every parameter gets a finite gradient."""
    from llmkit.model import ModelConfig, Transformer
    from llmkit.train.config import TrainConfig
    from llmkit.train.trainer import Trainer

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=16, pos="rope",
                      activation="swiglu", norm="rmsnorm")
    tr = Trainer(Transformer(cfg), TrainConfig(max_steps=1, micro_batch_size=2, seq_len=16, dtype=dtype,
                                               progress=False, tensorboard=False), iter(()))
    x = torch.randint(0, 64, (2, 17))
    tr.train_step([{"input_ids": x[:, :-1], "labels": x[:, 1:]}])
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in tr.raw_model.parameters())


@pytest.mark.slow
def test_rope_under_torch_compile():
    """torch.compile (TrainConfig.compile) traces the plain RoPE ops: same values and gradient."""
    g = torch.Generator().manual_seed(5)
    f = torch.rand(8, generator=g)
    emb = torch.cat([f, f])[None, None, None] * torch.arange(6.0)[:, None]
    cos, sin = emb.cos()[None], emb.sin()[None]
    x = torch.randn(2, 3, 6, 16, generator=g, requires_grad=True)
    compiled = torch.compile(lambda t: Lyr.apply_rope(t, cos, sin))
    out = compiled(x)
    (gx,) = torch.autograd.grad(out.sum(), x)
    ref = Lyr._rope(x, cos, sin)
    (gr,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, gr)


def test_float32_output_does_not_depend_on_requires_grad():
    """Frozen-base adapters, DPO's reference vs policy and PEFT's 'init equals base' compare a model with and
    without gradients: in float32 the training Functions (RMSNorm, RoPE) give the inference path's bits."""
    from llmkit.model.config import ModelConfig
    from llmkit.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                    max_seq_len=32, norm="rmsnorm", pos="rope", activation="swiglu"))
    ids = torch.randint(0, 64, (2, 12))
    with_grad = model(ids)
    with torch.no_grad():
        assert torch.equal(model(ids), with_grad)
    for p in model.parameters():
        p.requires_grad_(False)
    assert torch.equal(model(ids), with_grad)


needs_fused = pytest.mark.skipif(Lyr.fused_f32(torch.zeros(1)) is None, reason="native extension unavailable")


@needs_fused
def test_native_norm_swiglu_rope_equal_float64_autograd():
    """The fused float32 kernels (RMSNorm with Gemma's offset, SwiGLU, RoPE on a transposed projection view):
    values and gradients against the plain formulas in float64; RoPE keeps its input's memory layout."""
    g = torch.Generator().manual_seed(7)

    def check(fast_fn, ref_fn, inputs, tol=2e-6):
        xs = [t.detach().requires_grad_() for t in inputs]
        ds = [t.detach().double().requires_grad_() for t in inputs]
        out, ref = fast_fn(*xs), ref_fn(*ds)
        up = torch.randn(out.shape, generator=g)
        a = torch.autograd.grad((out * up).sum(), xs)
        b = torch.autograd.grad((ref * up.double()).sum(), ds)
        for u, v in zip((out, *a), (ref, *b)):
            assert u.dtype == torch.float32
            assert ((u.double() - v).abs().max() / v.abs().max()) < tol
        return out

    for offset, d in ((0.0, 40), (1.0, 19)):  # a width off the 16-lane vectors
        norm = Norm(d, "rmsnorm", 1e-6, offset=offset)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(d, generator=g))
        x = torch.randn(3, 5, d, generator=g)
        check(lambda x, w: Lyr._NativeRMSNorm.apply(x, w, 1e-6, offset),
              lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (w + offset),
              (x, norm.weight.detach()))
    gate, upv = torch.randn(4, 7, 37, generator=g) * 4, torch.randn(4, 7, 37, generator=g)
    gate[0, 0, :6] = torch.tensor([-100.0, -90.0, -88.0, 88.0, 90.0, 100.0])  # exp(-g) past float32's range
    check(Lyr._NativeSwiGLU.apply, lambda a, b: F.silu(a) * b, (gate, upv))
    B, H, T, D = 2, 3, 9, 40
    x = torch.randn(B, T, H, D, generator=g).transpose(1, 2)  # the projection's layout
    ang = torch.rand(B, 1, T, D // 2, generator=g) * 6
    c, s = ang.cos(), ang.sin()
    cos, sin = torch.cat([c, c], -1), torch.cat([s, s], -1)
    out = check(lambda x: Lyr._NativeRope.apply(x, c, s), lambda x: Lyr._rope(x, cos.double(), sin.double()), (x,))
    assert out.stride() == x.stride()


@needs_fused
@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_native_cross_entropy_rows_equal_float64(z_loss):
    """linear_cross_entropy in float32 (native softmax rows) against F.cross_entropy + z-loss in float64:
    loss and gradients, with ignored labels, a partial last chunk and confident rows."""
    from llmkit.train.fused_loss import linear_cross_entropy

    g = torch.Generator().manual_seed(8)
    w = torch.randn(300, 24, generator=g)
    y = torch.randint(0, 300, (90,), generator=g)
    h = torch.randn(90, 24, generator=g)
    h[:30] += 4 * w[y[:30]]  # p_target close to 1 in a third of the rows
    y[5:11] = -100
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, _ = linear_cross_entropy(hh, ww, y, z_loss, chunk=32)
    a = torch.autograd.grad(loss, (hh, ww))
    hd, wd = h.double().requires_grad_(), w.double().requires_grad_()
    logits = hd @ wd.t()
    keep = y != -100
    ref = F.cross_entropy(logits, y) + z_loss * (logits.logsumexp(-1)[keep] ** 2).mean()
    b = torch.autograd.grad(ref, (hd, wd))
    assert abs(loss.item() - ref.item()) < 1e-5 * max(1.0, ref.item())
    for u, v in zip(a, b):
        assert ((u.double() - v).abs().max() / v.abs().max()) < 1e-5


@needs_native
def test_fp32_training_step_takes_the_native_kernels(monkeypatch):
    """A float32 Trainer step on CPU runs the native attention in every layer, the fused RMSNorm, SwiGLU and RoPE
    Functions and the native cross-entropy rows."""
    import llmkit.train.fused_loss as FL

    calls = {"attn": 0, "norm": 0, "add_norm": 0, "swiglu": 0, "rope": 0, "xent": 0}
    monkeypatch.setattr(A, "native_causal_attention", _counting(calls, A.native_causal_attention, "attn"))
    monkeypatch.setattr(Lyr._NativeRMSNorm, "apply", _counting(calls, Lyr._NativeRMSNorm.apply, "norm"))
    monkeypatch.setattr(Lyr._NativeAddRMSNorm, "apply", _counting(calls, Lyr._NativeAddRMSNorm.apply, "add_norm"))
    monkeypatch.setattr(Lyr._NativeSwiGLU, "apply", _counting(calls, Lyr._NativeSwiGLU.apply, "swiglu"))
    monkeypatch.setattr(Lyr._NativeRope, "apply", _counting(calls, Lyr._NativeRope.apply, "rope"))
    ext = Lyr.native_ext()

    class Counting:  # the extension module's functions are read-only: wrap the module
        def __getattr__(self, name):
            fn = getattr(ext, name)
            return _counting(calls, fn, "xent") if name == "softmax_xent_" else fn

    monkeypatch.setattr(FL, "fused_f32", lambda *t: Counting() if Lyr.fused_f32(*t) is not None else None)
    _one_training_step("fp32")
    # the first norm has no residual add before it; the other 2 * 3 norms take the add before them
    assert calls == {"attn": 3, "norm": 1, "add_norm": 2 * 3, "swiglu": 3, "rope": 2 * 3, "xent": 1}


@needs_fused
def test_global_norm_equals_float64_on_any_thread_count():
    """The clipping norm's native pass: within float32 summation error of the float64 norm (sizes with chunk and
    vector tails), the same bits on 1 and 2 threads, inf and NaN passed through like torch's."""
    g = torch.Generator().manual_seed(3)
    ts = [torch.randn(n, generator=g) * s for n, s in ((3 * 32768 + 5, 1e-3), (384, 10.0), (7, 3.0), (40000, 0.1))]
    ref = float(torch.linalg.vector_norm(torch.cat([t.double() for t in ts])))
    ext = Lyr.native_ext()
    threads = torch.get_num_threads()
    try:
        got = []
        for n in (1, 2):
            torch.set_num_threads(n)
            got.append(ext.global_norm(ts))
    finally:
        torch.set_num_threads(threads)
    assert got[0] == got[1] and got[0] == pytest.approx(ref, rel=1e-6)
    ts[2][1] = float("inf")
    assert ext.global_norm(ts) == float("inf")
    ts[2][1] = float("nan")
    assert math.isnan(ext.global_norm(ts))
    assert ext.global_norm([]) == 0.0


@needs_fused
@pytest.mark.parametrize("d,offset", [(64, 0.0), (100, 0.0), (48, 1.0)])
@pytest.mark.parametrize("use_sum", [True, False])
def test_add_rmsnorm_same_bits_as_add_then_norm(d, offset, use_sum):
    """Norm.add_forward(x, delta) = (x + delta, norm(x + delta)) in one native pass, and its backward adds the
    residual stream's gradient in the same pass: values and all gradients equal the separate add and norm to
    the bit (rows of 100 take the kernels' scalar tails), also when only the normalised output is used."""
    g = torch.Generator().manual_seed(d)
    norm = Norm(d, "rmsnorm", 1e-5, offset=offset)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d, generator=g) * 0.5 + (0.0 if offset else 1.0))
    x0, a0 = torch.randn(3, 7, d, generator=g), torch.randn(3, 7, d, generator=g)
    gh, gy = torch.randn(3, 7, d, generator=g), torch.randn(3, 7, d, generator=g)

    def run(fused):
        x, a = x0.clone().requires_grad_(), a0.clone().requires_grad_()
        norm.weight.grad = None
        if fused:
            h, y = norm.add_forward(x, a)
            assert type(h.grad_fn).__name__ == "_NativeAddRMSNormBackward"
        else:
            h = x + a
            y = norm(h)
        torch.autograd.backward([h, y] if use_sum else [y], [gh, gy] if use_sum else [gy])
        return h, y, x.grad, a.grad, norm.weight.grad

    for got, want in zip(run(True), run(False)):
        assert torch.equal(got, want)


@needs_fused
@pytest.mark.parametrize("kind", ["decoder", "sandwich", "encoder_decoder"])
def test_deferred_residual_adds_same_bits(kind, monkeypatch):
    """Pre-norm blocks hand their last residual branch to the next norm, which adds it in its own native pass
    (`Block.forward`, `Transformer._finish`): logits and every parameter gradient equal those of torch's add
    followed by the norm, to the bit; the native add + norm is taken for every norm after the first."""
    from llmkit.model import ModelConfig, Transformer

    extra = {"sandwich": dict(norm_position="sandwich"), "encoder_decoder": dict(arch="encoder_decoder", pos="learned",
                                                                                n_encoder_layers=2)}.get(kind, {})
    cfg = ModelConfig(**{**dict(vocab_size=97, d_model=80, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=144,
                                max_seq_len=32, pos="rope", activation="swiglu", norm="rmsnorm"), **extra})
    torch.manual_seed(0)
    model = Transformer(cfg)
    ids = torch.randint(0, 97, (2, 24))
    kw = {"encoder_input_ids": torch.randint(0, 97, (2, 20))} if kind == "encoder_decoder" else {}
    calls = {"add_norm": 0}
    monkeypatch.setattr(Lyr._NativeAddRMSNorm, "apply", _counting(calls, Lyr._NativeAddRMSNorm.apply, "add_norm"))

    def run():
        model.zero_grad(set_to_none=True)
        logits = model(ids, **kw)
        logits.float().pow(2).mean().backward()
        return logits.detach(), [p.grad for p in model.parameters()]

    fast = run()
    assert calls["add_norm"] > 0

    def torch_add(self, x, delta):
        h = x if delta is None else x + delta
        return h, self(h)

    monkeypatch.setattr(Norm, "add_forward", torch_add)
    ref = run()
    assert torch.equal(fast[0], ref[0])
    assert all(torch.equal(a, b) for a, b in zip(fast[1], ref[1]))
