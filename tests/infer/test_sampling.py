"""Samplers against transformers' logits processors on the same logits, plus hand-made cases."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
lp = pytest.importorskip("transformers.generation.logits_process")

from llmkit.infer.sampling import (  # noqa: E402
    GenerationConfig, apply_min_p, apply_top_p, ban_repeated_ngrams, make_generator, next_token_probs, sample_next,
    warp,
)


def _finite_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(a), torch.isinf(b))
    torch.testing.assert_close(a[torch.isfinite(a)], b[torch.isfinite(b)], rtol=1e-5, atol=1e-5)


def test_top_p_hand_made():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    # smallest set with cumulative >= p: {0.5} for p=0.5; {0.5, 0.3} for p=0.6 and 0.8; three tokens for p=0.81
    for p, kept in [(0.5, 1), (0.6, 2), (0.8, 2), (0.81, 3), (0.96, 4), (1e-3, 1)]:
        out = apply_top_p(logits, p)
        assert torch.isfinite(out).sum().item() == kept, p
        assert torch.isfinite(out[0, :kept]).all()  # the kept ones are the most likely
    shuffled = logits[:, [2, 0, 3, 1]]
    assert torch.isfinite(apply_top_p(shuffled, 0.6)).tolist() == [[False, True, False, True]]


def test_min_p_hand_made():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert torch.isfinite(apply_min_p(logits, 0.5)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(apply_min_p(logits, 0.2)).tolist() == [[True, True, True, False]]


@pytest.mark.parametrize("name,kw,hf", [
    ("temperature", dict(temperature=0.7), lambda: lp.TemperatureLogitsWarper(0.7)),
    ("top_k", dict(top_k=5), lambda: lp.TopKLogitsWarper(5)),
    ("top_p", dict(top_p=0.8), lambda: lp.TopPLogitsWarper(0.8)),
    ("min_p", dict(min_p=0.1), lambda: lp.MinPLogitsWarper(0.1)),
    ("typical", dict(typical_p=0.6), lambda: lp.TypicalLogitsWarper(0.6)),
    ("epsilon", dict(epsilon_cutoff=0.02), lambda: lp.EpsilonLogitsWarper(0.02)),
    ("eta", dict(eta_cutoff=0.02), lambda: lp.EtaLogitsWarper(0.02)),
])
def test_warpers_match_transformers(name, kw, hf):
    logits = torch.randn(4, 50) * 3
    ids = torch.zeros(4, 1, dtype=torch.long)
    _finite_equal(warp(logits, GenerationConfig(**kw)), hf()(ids, logits.clone()))


def test_warper_chain_matches_transformers():
    logits = torch.randn(3, 64) * 2
    ids = torch.zeros(3, 1, dtype=torch.long)
    chain = lp.LogitsProcessorList([lp.TemperatureLogitsWarper(0.8), lp.TopKLogitsWarper(20),
                                    lp.TopPLogitsWarper(0.9), lp.MinPLogitsWarper(0.05)])
    ours = warp(logits, GenerationConfig(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05))
    _finite_equal(ours, chain(ids, logits.clone()))


def test_repetition_penalty_matches_transformers():
    logits = torch.randn(3, 40) * 2
    prev = torch.randint(0, 40, (3, 12))
    hf = lp.RepetitionPenaltyLogitsProcessor(1.3)(prev, logits.clone())
    from llmkit.infer.sampling import apply_penalties
    torch.testing.assert_close(apply_penalties(logits, GenerationConfig(repetition_penalty=1.3), prev), hf)


def test_padding_is_ignored_by_penalties():
    from llmkit.infer.sampling import apply_penalties
    logits = torch.randn(1, 10)
    cfg = GenerationConfig(repetition_penalty=2.0, no_repeat_ngram_size=2)
    a = apply_penalties(logits, cfg, torch.tensor([[-1, -1, 3, 4, 3]]))
    b = apply_penalties(logits, cfg, torch.tensor([[3, 4, 3]]))
    torch.testing.assert_close(a, b)


def test_no_repeat_ngram_matches_transformers():
    logits = torch.randn(2, 12)
    prev = torch.tensor([[1, 2, 3, 1, 2, 5, 1, 2], [4, 4, 4, 4, 7, 8, 9, 4]])
    for n in (1, 2, 3):
        hf = lp.NoRepeatNGramLogitsProcessor(n)(prev, logits.clone())
        _finite_equal(ban_repeated_ngrams(logits, prev, n), hf)


def test_frequency_presence_penalties():
    from llmkit.infer.sampling import apply_penalties
    logits = torch.zeros(1, 5)
    out = apply_penalties(logits, GenerationConfig(frequency_penalty=0.5, presence_penalty=1.0),
                          torch.tensor([[1, 1, 2]]))
    assert out.tolist() == [[0.0, -2.0, -1.5, 0.0, 0.0]]


def test_temperature_zero_and_top_k_one_are_greedy():
    logits = torch.randn(8, 100)
    greedy = logits.argmax(-1)
    assert torch.equal(sample_next(logits, GenerationConfig(temperature=0.0)), greedy)
    g = make_generator(1)
    assert torch.equal(sample_next(logits, GenerationConfig(temperature=1.5, top_k=1), g), greedy)
    assert torch.equal(sample_next(logits, GenerationConfig(temperature=1e-4), g), greedy)


def test_sampling_distribution_and_seed():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = probs.log().expand(20000, 4).contiguous()
    cfg = GenerationConfig(temperature=1.0)
    toks = sample_next(logits, cfg, make_generator(0))
    freq = torch.bincount(toks, minlength=4).float() / len(toks)
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)
    assert torch.equal(toks, sample_next(logits, cfg, make_generator(0)))
    assert not torch.equal(toks, sample_next(logits, cfg, make_generator(1)))


def test_per_row_configs_and_generators():
    logits = torch.randn(3, 30)
    cfgs = [GenerationConfig(temperature=0.0), GenerationConfig(top_k=1), GenerationConfig(temperature=1.0, seed=3)]
    gens = [None, make_generator(1), make_generator(3)]
    a = sample_next(logits, cfgs, gens)
    assert a[0] == logits[0].argmax() and a[1] == logits[1].argmax()
    b = sample_next(logits, cfgs, [None, make_generator(1), make_generator(3)])
    assert torch.equal(a, b)
    # mixed per-row top-k equals doing each row alone
    cfgs = [GenerationConfig(top_k=3), GenerationConfig(top_k=0), GenerationConfig(top_k=7, top_p=0.5)]
    mixed = warp(logits, cfgs)
    for i, c in enumerate(cfgs):
        _finite_equal(mixed[i:i + 1], warp(logits[i:i + 1], c))


def test_next_token_probs_greedy_row_is_one_hot():
    logits = torch.randn(2, 9)
    p = next_token_probs(logits, [GenerationConfig(temperature=0), GenerationConfig(top_k=2)])
    assert p[0].max() == 1 and p[0].argmax() == logits[0].argmax()
    assert (p[1] > 0).sum() == 2 and torch.isclose(p[1].sum(), torch.tensor(1.0))


def test_bad_config_errors():
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=0)
    with pytest.raises(TypeError, match="unknown generation option"):
        GenerationConfig().updated(topp=0.5)
