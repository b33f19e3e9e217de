"""The fused decode path computes the model's own forward: logits within 1e-5 in fp32 (prompt, padded batch,
decode steps), identical greedy generations, quantised variants close to the quantised model."""
from __future__ import annotations

import copy

import pytest
import torch
from engine_util import single_thread, tiny_model  # noqa: F401 (autouse fixture)

from llmkit.infer.engine import decode_tokens
from llmkit.infer.fused import FastDecoder, Unsupported, enable_fast_decode
from llmkit.infer.sampling import GenerationConfig

SUPPORTED = ["llama_gqa", "mqa_tied", "learned_gelu", "parallel"]
EXTRA = {"rope_llama3_bias": dict(qkv_bias=True, attn_out_bias=True, mlp_bias=True, n_kv_heads=2,
                                  rope_scaling={"type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16}),
         "gemma_like": dict(norm_offset=1.0, embed_scale=5.66, logit_softcap=30.0, activation="geglu_tanh")}


def _model(name):
    return tiny_model(name) if name in SUPPORTED else tiny_model("llama_gqa", **EXTRA[name])


@pytest.mark.parametrize("name", SUPPORTED + list(EXTRA))
def test_fused_logits_equal_model(name):
    m = _model(name)
    ref = copy.deepcopy(m)
    fast = FastDecoder(m)
    ids = torch.randint(0, 300, (2, 7))
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :3] = False  # row 1 is left-padded
    pos = (valid.cumsum(1) - 1).clamp(min=0)
    c_ref, c_fast = ref.new_cache(2, 12), m.new_cache(2, 12)
    with torch.no_grad():
        want = ref(ids, positions=pos[:, :7], attn_mask=valid[:, :7], cache=c_ref)
        got = fast(ids, positions=pos[:, :7], attn_mask=valid[:, :7], cache=c_fast, last_only=False)
        assert (got - want).abs().max() < 1e-5
        for t in range(7, 10):  # decode steps on the shared cache layout
            tok = torch.randint(0, 300, (2, 1))
            want = ref(tok, positions=pos[:, t:t + 1], attn_mask=valid[:, :t + 1], cache=c_ref)[:, -1]
            got = fast(tok, positions=pos[:, t:t + 1], attn_mask=valid[:, :t + 1], cache=c_fast)
            assert (got - want).abs().max() < 1e-5
        # a multi-token chunk on top of a cache without padding (speculative verification)
        c_ref, c_fast = ref.new_cache(1, 12), m.new_cache(1, 12)
        ref(ids[:1, :4], cache=c_ref), fast(ids[:1, :4], positions=pos[:1, 3:7] - 3, cache=c_fast)
        chunk_pos = torch.arange(4, 7)[None]
        want = ref(ids[:1, 4:], positions=chunk_pos, cache=c_ref)
        assert (fast(ids[:1, 4:], positions=chunk_pos, cache=c_fast, last_only=False) - want).abs().max() < 1e-5
    # the model itself still works (its q/k/v/gate/up weights are views of the fused ones)
    assert (m(ids) - ref(ids)).abs().max() < 1e-5


def test_generation_with_fast_path_equals_plain():
    m = tiny_model("llama_gqa")
    prompts = [[5, 17, 42], [7, 8, 9, 10, 11, 12, 13], [100, 3, 250, 4, 9]]
    cfg = GenerationConfig(max_new_tokens=10, temperature=0)

    def run(model):
        out = [[] for _ in prompts]
        for ev in decode_tokens(model, prompts, cfg, eos_ids=[7]):
            for i, t in ev:
                out[i].append(t)
        return out

    want = run(copy.deepcopy(m))
    assert enable_fast_decode(m)
    assert run(m) == want


@pytest.mark.parametrize("mode,tol", [("int8", 0.03), ("int4", 0.25)])
def test_quantised_fast_path(mode, tol):
    m = tiny_model("llama_gqa", d_model=64)
    ref = copy.deepcopy(m)
    assert enable_fast_decode(m, mode)
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        got = m.fast_decoder(ids, positions=torch.arange(9)[None], cache=m.new_cache(1, 9))
        want = ref(ids)[:, -1]
        quant_model = m(ids)[:, -1]  # the model's own (quantised) forward
    assert float((got.float() - want).norm() / want.norm()) < tol
    assert float((got.float() - quant_model.float()).norm() / quant_model.float().norm()) < 0.02


def test_unsupported_architectures_fall_back():
    for name in ("alibi", "t5bias", "window_local_global", "gemma2_softcap", "moe"):
        m = tiny_model(name)
        with pytest.raises(Unsupported):
            FastDecoder(m)
        assert enable_fast_decode(m) is False and "fast_decoder" not in m.__dict__


def test_bfloat16_fast_path_close_to_model():
    m = tiny_model("llama_gqa", d_model=64).to(torch.bfloat16)
    ref = copy.deepcopy(m)
    assert enable_fast_decode(m)
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        got = m.fast_decoder(ids, positions=torch.arange(9).expand(2, 9), cache=m.new_cache(2, 9))
        want = ref(ids)[:, -1]
    assert got.dtype == torch.bfloat16
    assert float((got.float() - want.float()).norm() / want.float().norm()) < 0.02  # bfloat16 rounding only
