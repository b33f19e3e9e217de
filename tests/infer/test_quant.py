"""Weight-only int8 / int4: quantisation error bounds, kernels against the dequantised weights, whole-model
logits against float, lossless re-quantisation of GGUF Q4_1 blocks (gguf's own quantiser)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from engine_util import single_thread, tiny_model  # noqa: F401 (autouse fixture)

from llmkit.infer.engine import decode_tokens
from llmkit.infer.quant import Int4Linear, Int8Linear, choose_group, quantize_model
from llmkit.infer.sampling import GenerationConfig


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("N,K", [(48, 64), (300, 96), (12, 32), (7, 88), (5, 40)])  # 88, 40: ragged K
def test_int8_error_bound_and_kernel(N, K):
    w, x, b = torch.randn(N, K), torch.randn(5, K), torch.randn(N)
    m = Int8Linear(w, b)
    deq = m.dequantize()
    step = w.abs().amax(1, keepdim=True) / 127
    assert ((deq - w).abs() <= step / 2 * 1.01 + 1e-6).all()  # round-to-nearest: half a step per weight
    # the kernel computes x @ deq.T (activations and scales in bfloat16: ~3 significant digits)
    assert _rel(m(x), x @ deq.t() + b) < 1e-2


@pytest.mark.parametrize("N,K,group", [(48, 64, 32), (300, 96, 32), (32, 256, 128), (16, 576, 128)])
def test_int4_error_bound_and_kernel(N, K, group):
    w, x = torch.randn(N, K), torch.randn(5, K)
    m = Int4Linear(w, None, group)
    assert m.group_size == choose_group(K, group)
    deq = m.dequantize()
    g = w.reshape(N, K // m.group_size, m.group_size)
    step = ((g.amax(-1) - g.amin(-1)) / 15).repeat_interleave(m.group_size, 1)
    # half a step; dequantize() itself returns bfloat16 values (relative rounding 2^-9)
    assert ((deq - w).abs() <= step / 2 * 1.02 + w.abs() * 2**-8 + 1e-4).all()
    exact = Int4Linear(w, None, group, compute_dtype=torch.float32).dequantize()
    assert ((exact - w).abs() <= step / 2 + 1e-5).all()
    assert _rel(m(x), x @ deq.t()) < 1e-2


def test_int4_requantises_gguf_q4_1_losslessly():
    gguf = pytest.importorskip("gguf")
    from gguf import quants

    w = np.random.default_rng(0).standard_normal((32, 128)).astype(np.float32)
    t = gguf.GGMLQuantizationType.Q4_1
    loaded = torch.from_numpy(quants.dequantize(quants.quantize(w, t), t).copy())  # what a Q4_1 GGUF loads as
    m = Int4Linear(loaded, None, 32, compute_dtype=torch.float32)
    assert (m.dequantize() - loaded).abs().max() < 1e-5


def test_choose_group_falls_back_for_576():
    assert choose_group(576, 128) == 64 and choose_group(576, 32) == 32  # SmolLM2's d_model
    with pytest.raises(ValueError, match="group_size"):
        choose_group(576, 48)


@pytest.mark.parametrize("mode,tol", [("int8", 0.03), ("int4", 0.25)])
@pytest.mark.parametrize("arch", ["llama_gqa", "mqa_tied", "learned_gelu"])
def test_quantised_model_logits_close_to_float(mode, tol, arch):
    """Tolerance: relative L2 error of the logits, int8 < 3% and int4 (group 32) < 25% on random weights."""
    m = tiny_model(arch, d_model=64)
    q = quantize_model(copy.deepcopy(m), mode, group_size=32)
    assert not any(isinstance(x, torch.nn.Linear) for x in q.modules())
    assert q.lm_head is not None and isinstance(q.lm_head, (Int8Linear, Int4Linear))
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        ref, got = m(ids), q(ids)
    assert got.dtype == torch.bfloat16
    assert _rel(got, ref) < tol
    # greedy decoding runs on the quantised model through the same engine
    out = next(iter(decode_tokens(q, [[1, 2, 3]], GenerationConfig(max_new_tokens=2, temperature=0))))
    assert len(out) == 1


def test_bad_mode():
    with pytest.raises(ValueError, match="int8 or int4"):
        quantize_model(tiny_model(), "int3")
