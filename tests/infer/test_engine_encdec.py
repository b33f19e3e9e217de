"""Generation from encoder-decoder models (T5-style): the prompt feeds the encoder once, the decoder starts from
decoder_start_token_id and reuses cached self- and cross-attention; equals a full recompute every step."""
from __future__ import annotations

import pytest
import torch
from engine_util import single_thread  # noqa: F401 (autouse fixture)

from llmkit.infer.engine import generate
from llmkit.infer.sampling import GenerationConfig
from llmkit.model import ModelConfig, Transformer


def _model(pos: str) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="encoder_decoder", vocab_size=120, d_model=32, n_layers=2, n_heads=4, pos=pos,
                      max_seq_len=64, decoder_start_token_id=0, pad_token_id=0)
    m = Transformer(cfg).eval()
    with torch.no_grad():
        m.embed.weight.mul_(20)
    return m


def _uncached_greedy(m, enc: list[int], n: int) -> list[int]:
    dec = [0]
    with torch.no_grad():
        for _ in range(n):
            logits = m(torch.tensor([dec]), encoder_input_ids=torch.tensor([enc]))[:, -1]
            dec.append(int(logits.argmax(-1)))
    return dec[1:]


@pytest.mark.parametrize("pos", ["t5", "learned", "rope"])
def test_encoder_decoder_greedy_equals_full_recompute_and_batches(pos):
    m = _model(pos)
    prompts = [[5, 17, 42, 9], [7, 8, 9, 10, 11, 12, 13, 14, 3], [100]]
    cfg = GenerationConfig(max_new_tokens=8, temperature=0, eos_token_id=[])
    batched = generate(m, None, prompts, cfg)
    for p, c in zip(prompts, batched):
        want = _uncached_greedy(m, p, 8)
        assert c.token_ids == want
        assert generate(m, None, [p], cfg)[0].token_ids == want
        assert c.prompt_tokens == len(p)


def test_encoder_decoder_sampling_is_seeded_and_beams_are_refused():
    m = _model("t5")
    cfg = GenerationConfig(max_new_tokens=6, temperature=1.0, top_k=20, seed=3, eos_token_id=[])
    a = generate(m, None, [[5, 6, 7]], cfg)[0].token_ids
    assert a == generate(m, None, [[5, 6, 7]], cfg)[0].token_ids and len(a) == 6
    with pytest.raises(ValueError, match="encoder-decoder"):
        generate(m, None, [[5, 6, 7]], GenerationConfig(max_new_tokens=4, num_beams=2))
