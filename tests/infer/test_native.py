"""The native decode step (llmkit/infer/native.py, csrc/decode.cpp) against PyTorch on the same weights:
each weight format's matmul against F.linear on the dequantised weight, Q4_1 packing against the GGUF
reader's own dequantisation, and one-token steps against the model's forward for every supported layout."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from engine_util import single_thread, tiny_model  # noqa: F401 (autouse fixture)

from llmkit.infer.engine import decode_tokens
from llmkit.infer.fused import FastDecoder, enable_fast_decode
from llmkit.infer.native import load_extension, pack_int8, pack_q4_1, qlinear, unpack_q4_1
from llmkit.infer.sampling import GenerationConfig

ext = load_extension()
pytestmark = pytest.mark.skipif(ext is None, reason="no C++ compiler: the native kernels could not be built")


def _dequant(w, kind):
    if kind == "int8":
        q, s = pack_int8(w)
        return q.float() * s[:, None]
    if kind == "int4":
        return unpack_q4_1(pack_q4_1(w))
    return w.to(getattr(torch, kind)).float()


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "int8", "int4"])
@pytest.mark.parametrize("M", [1, 3, 11])  # 11 crosses the 8-row block of the kernel
def test_qlinear_equals_linear_on_dequantised_weight(kind, M):
    torch.manual_seed(0)
    N, K = 70, 96
    w, b, x = torch.randn(N, K), torch.randn(N), torch.randn(M, K)
    stored = w.to(getattr(torch, kind)) if kind in ("float32", "bfloat16") else w
    q = qlinear(ext, stored, b, kind)
    assert (q.N, q.K) == (N, K)
    want = F.linear(x.double(), _dequant(w, kind).double(), b.double())
    if kind == "bfloat16" and ext.bf16dp():  # VDPBF16PS: activations rounded to bfloat16, float32 sums
        want = F.linear(x.bfloat16().double(), _dequant(w, kind).double(), b.double())
    if kind == "int4" and M == 1 and ext.vnni():
        want = _q4_1_times_q8(pack_q4_1(w), x, b)
    assert (q(x).double() - want).abs().max() < 1e-4 * want.abs().max()


def _q4_1_times_q8(blocks, x, b):
    """llama.cpp's Q4_1 x Q8_1 product: x quantised to int8 per 32-block for the q*d part, exact for the m part."""
    N, nb, _ = blocks.shape
    dm = blocks[..., :4].contiguous().view(torch.float16).double()  # [N, nb, 2]
    qs = blocks[..., 4:].to(torch.int64)
    q = torch.cat([qs & 15, qs >> 4], -1).double()  # [N, nb, 32]
    xb = x.double().reshape(nb, 32)
    sx = (xb.float().abs().amax(1) / 127).double()
    xq = torch.round(xb.float() / sx.float()[:, None].clamp(min=1e-30)).double()
    dots = torch.einsum("nbj,bj->nb", q, xq)
    return ((dots * dm[..., 0] * sx).sum(1) + (dm[..., 1] * xb.sum(1)).sum(1) + b.double())[None]


def test_q4_1_packing_matches_gguf_and_round_trips_gguf_blocks():
    gguf = pytest.importorskip("gguf")
    torch.manual_seed(1)
    w = torch.randn(8, 64) * torch.linspace(0.1, 3, 64)
    blocks = pack_q4_1(w)
    # the gguf package's own Q4_1 dequantisation of our bytes equals ours
    theirs = gguf.quants.dequantize(blocks.numpy().reshape(8, -1), gguf.GGMLQuantizationType.Q4_1)
    ours = unpack_q4_1(blocks)
    assert np.array_equal(theirs.astype(np.float32), ours.numpy())
    # error bounded by half a step per block; re-packing dequantised Q4_1 weights gives the same blocks
    step = blocks[..., :2].contiguous().view(torch.float16).float().repeat_interleave(32, 1).reshape(8, 64)
    assert bool(((ours - w).abs() <= step / 2 + 1e-6).all())
    assert torch.equal(pack_q4_1(ours), blocks)


def test_ragged_widths_and_logit_softcap_keep_the_pytorch_path():
    assert FastDecoder(tiny_model("llama_gqa", d_ff=88)).native is None
    m = tiny_model("llama_gqa", d_ff=96, logit_softcap=30.0)
    ref = copy.deepcopy(m)
    fast = FastDecoder(m)
    assert fast.native is None
    ids = torch.randint(0, 300, (1, 6))
    cache = m.new_cache(1, 6)
    with torch.no_grad():
        fast(ids[:, :5], positions=torch.arange(5)[None], cache=cache)
        got = fast(ids[:, 5:], positions=torch.tensor([[5]]), cache=cache)
        assert (got - ref(ids)[:, -1]).abs().max() < 1e-5  # the soft-cap is applied on the PyTorch path


def test_q4_1_rejects_ragged_width():
    with pytest.raises(ValueError, match="divisible by 32"):
        pack_q4_1(torch.randn(4, 48))


NATIVE = {"llama_gqa": ("llama_gqa", {}), "mqa_tied": ("mqa_tied", {}), "parallel": ("parallel", {}),
          "learned_gelu_biases": ("learned_gelu", {}),
          "gemma_like": ("llama_gqa", dict(norm_offset=1.0, embed_scale=5.66, activation="geglu_tanh")),
          "qwen_bias_rope_scaled": ("llama_gqa", dict(qkv_bias=True, rope_scaling={"type": "linear", "factor": 2.0})),
          "relu_plain_mlp": ("llama_gqa", dict(activation="relu", norm="layernorm"))}


@pytest.mark.parametrize("name", list(NATIVE))
def test_native_steps_equal_model_forward(name):
    arch, kw = NATIVE[name]
    m = tiny_model(arch, d_ff=96, **kw)
    ref = copy.deepcopy(m)
    fast = FastDecoder(m)
    assert fast.native is not None
    ids = torch.randint(0, 300, (1, 12))
    cache = m.new_cache(1, 16)
    with torch.no_grad():
        fast(ids[:, :6], positions=torch.arange(6)[None], cache=cache)  # prompt: PyTorch path
        full = ref(ids)
        for t in range(6, 12):  # native one-token steps continue the same cache
            got = fast(ids[:, t:t + 1], positions=torch.tensor([[t]]), cache=cache)
            assert got.dtype == torch.float32 and got.shape == (1, 300)
            assert (got - full[:, t]).abs().max() < 1e-4
    assert cache.length == 12


def test_native_bfloat16_cache_and_weights():
    m = tiny_model("llama_gqa", d_model=64, d_ff=128).to(torch.bfloat16)
    ref = tiny_model("llama_gqa", d_model=64, d_ff=128).to(torch.bfloat16).float()  # same bf16-rounded weights, fp32 math
    fast = FastDecoder(m)
    ids = torch.randint(0, 300, (1, 10))
    cache = m.new_cache(1, 10)
    with torch.no_grad():
        fast(ids[:, :5], positions=torch.arange(5)[None], cache=cache)
        want = ref(ids)
        for t in range(5, 10):
            got = fast(ids[:, t:t + 1], positions=torch.tensor([[t]]), cache=cache)
            assert float((got - want[:, t]).norm() / want[:, t].norm()) < 0.02  # bf16 cache / prompt rounding


@pytest.mark.parametrize("mode,tol", [("int8", 0.02), ("int4", 0.2)])
def test_native_quantised_step_equals_dequantised_model(mode, tol):
    m = tiny_model("llama_gqa", d_model=64, d_ff=128)
    deq = copy.deepcopy(m)
    with torch.no_grad():  # the float model with exactly the weights the native kernels store (lm_head too)
        for mod in deq.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.copy_(_dequant(mod.weight.detach(), mode))
    assert enable_fast_decode(m, mode)  # quantises the model too: its cache is bfloat16
    fast = m.fast_decoder
    assert fast.native is not None and fast.native.kind == mode
    ids = torch.randint(0, 300, (1, 8))
    cache = m.new_cache(1, 8)
    with torch.no_grad():
        fast(ids[:, :7], positions=torch.arange(7)[None], cache=cache)
        got = fast(ids[:, 7:], positions=torch.tensor([[7]]), cache=cache)
        want = deq(ids)[:, -1]
        float_model = tiny_model("llama_gqa", d_model=64, d_ff=128)(ids)[:, -1]
    # the prompt ran in bfloat16 activations (the cache is bf16), the step in float32: close, not bitwise
    assert float((got - want).norm() / want.norm()) < tol / 10
    assert float((got - float_model).norm() / float_model.norm()) < tol


def test_native_greedy_generation_equals_pytorch_path():
    m = tiny_model("llama_gqa", d_ff=96)
    prompts = [[5, 17, 42], [7, 8, 9, 10, 11, 12, 13]]
    cfg = GenerationConfig(max_new_tokens=12, temperature=0)

    def run(model):
        out = [[] for _ in prompts]
        for ev in decode_tokens(model, prompts[:1], cfg, eos_ids=[]):
            for i, t in ev:
                out[i].append(t)
        return out

    plain = copy.deepcopy(m)
    assert enable_fast_decode(plain, native=False)
    assert enable_fast_decode(m) and m.fast_decoder.native is not None
    assert run(m) == run(plain)


def test_native_off_by_environment(monkeypatch):
    load_extension.cache_clear()
    monkeypatch.setenv("LLMKIT_NATIVE", "0")
    try:
        assert load_extension() is None
        assert FastDecoder(tiny_model("llama_gqa", d_ff=96)).native is None
    finally:
        load_extension.cache_clear()
        monkeypatch.delenv("LLMKIT_NATIVE")
        assert load_extension() is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logit_stats_equal_torch(dtype):
    """logsumexp and first argmax equal torch's on vocabulary-sized rows (odd width: a scalar tail), with rows
    holding ties at the maximum, -inf entries, very negative values (exp underflow) and a strided view."""
    from llmkit.infer.native import logit_stats

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(37, 5003, generator=g) * 6).to(dtype)
    x[0, 100] = x[0, 4000] = x[0].max() + 1  # tie: the first index wins
    x[1, 17:300] = float("-inf")
    x[2] = -1e4
    x[2, 4999] = 0.0  # the maximum in the scalar tail
    x[3, :] = 3.0  # every entry ties
    ref = x.float()
    for view in (x, x[:, 1:]):  # a non-contiguous row stride
        lse, arg = ext.logit_stats(view)
        assert torch.allclose(lse, view.float().logsumexp(-1), rtol=1e-6, atol=1e-5)
        assert torch.equal(arg, view.float().argmax(-1))
    lse, arg = logit_stats(x)
    assert torch.equal(arg, ref.argmax(-1)) and arg[0] == 100 and arg[3] == 0


def test_logit_stats_special_values_follow_torch():
    x = torch.zeros(4, 40)
    x[0, 5] = float("nan")
    x[1, :] = float("-inf")
    x[2, 7] = float("inf")
    x[3, 39] = float("nan")
    lse, arg = ext.logit_stats(x)
    assert torch.isnan(lse[0]) and arg[0] == 5 and torch.isnan(lse[3]) and arg[3] == 39
    assert lse[1] == float("-inf") and lse[2] == float("inf") and arg[2] == 7
    assert torch.equal(arg, x.argmax(-1))
