"""Beam search and speculative decoding: greedy limits, log-prob ordering, and the speculative sampling
rule preserving the target distribution (chi-square)."""
from __future__ import annotations

import pytest
import torch
from engine_util import single_thread, greedy_uncached, tiny_model  # noqa: F401 (autouse fixture)

from llmkit.infer.beam import beam_search
from llmkit.infer.engine import generate, sequence_logprob
from llmkit.infer.sampling import GenerationConfig, next_token_probs
from llmkit.infer.speculative import accept_reject, speculative_decode

stats = pytest.importorskip("scipy.stats")
PROMPT = [7, 8, 9, 10, 11]


def test_beam_one_equals_greedy():
    m = tiny_model("llama_gqa")
    toks, _ = beam_search(m, PROMPT, GenerationConfig(num_beams=1, max_new_tokens=10))
    assert toks == greedy_uncached(m, PROMPT, 10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_logprob_at_least_greedy(seed):
    m = tiny_model("llama_gqa", seed=seed)
    for n in (3, 8):
        cfg = GenerationConfig(num_beams=4, max_new_tokens=n, length_penalty=0.0)
        beam, score = beam_search(m, PROMPT, cfg)
        greedy = greedy_uncached(m, PROMPT, n)
        assert abs(score - sequence_logprob(m, PROMPT, beam)) < 1e-3  # the score is the sequence log-prob
        assert score >= sequence_logprob(m, PROMPT, greedy) - 1e-5


def test_beam_no_repeat_ngram_and_generate_api():
    m = tiny_model("llama_gqa")
    out = generate(m, None, PROMPT, GenerationConfig(num_beams=3, max_new_tokens=16, no_repeat_ngram_size=2))
    seq = PROMPT + out.token_ids
    grams = list(zip(seq, seq[1:]))
    assert len(grams) == len(set(grams))
    assert out.score is not None and len(out.token_ids) == 16


@pytest.mark.parametrize("draft_seed", [0, 5])
def test_speculative_greedy_equals_target_greedy(draft_seed):
    target = tiny_model("llama_gqa", seed=0)
    draft = tiny_model("mqa_tied", seed=draft_seed, n_layers=1)  # seed 0 shares nothing with the target's weights
    cfg = GenerationConfig(max_new_tokens=20, temperature=0)
    st: dict = {}
    got = list(speculative_decode(target, draft, PROMPT, cfg, num_draft=3, stats=st))
    assert got == greedy_uncached(target, PROMPT, 20)
    assert st["target_calls"] < 20 or st["accepted"] == 0
    # the draft equal to the target accepts everything: 20 tokens in ceil(20 / 4) target passes
    st = {}
    assert list(speculative_decode(target, target, PROMPT, cfg, num_draft=3, stats=st)) == got
    assert st["accepted"] == st["proposed"] and st["target_calls"] == 5
    assert generate(target, None, PROMPT, cfg, draft_model=draft).token_ids == got


def test_accept_reject_preserves_target_distribution():
    g = torch.Generator().manual_seed(0)
    V, n, N = 5, 2, 6000
    p = torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.1], [0.05, 0.05, 0.3, 0.3, 0.3], [0.2, 0.2, 0.2, 0.2, 0.2]])
    q = torch.tensor([[0.1, 0.1, 0.6, 0.1, 0.1], [0.3, 0.3, 0.1, 0.2, 0.1]])
    drafts = torch.stack([torch.multinomial(q[i], N, replacement=True, generator=g) for i in range(n)], 1)
    n_acc, nxt = accept_reject(p.expand(N, -1, -1), q.expand(N, -1, -1), drafts, g)
    first = torch.where(n_acc > 0, drafts[:, 0], nxt)  # the first emitted token
    counts = torch.bincount(first, minlength=V).numpy()
    assert stats.chisquare(counts, p[0].numpy() * N).pvalue > 1e-3
    assert (n_acc > 0).float().mean().item() == pytest.approx(float(torch.minimum(p[0], q[0]).sum()), abs=0.03)


@pytest.mark.slow  # 2000 draws of ~4 tiny forward passes: ~10 s of CPU
def test_speculative_sampling_matches_target_distribution():
    """Joint law of the first two sampled tokens, speculative vs the target's exact law (tiny vocab)."""
    V = 6
    target = tiny_model("llama_gqa", seed=0, vocab_size=V)
    draft = tiny_model("mqa_tied", seed=3, vocab_size=V, n_layers=1)
    cfg = GenerationConfig(max_new_tokens=2, temperature=0.5, top_k=5)
    prompt = [1, 2, 3]

    def joint(model):  # exact law of the first two tokens under `model` with cfg's warping
        with torch.no_grad():
            p1 = next_token_probs(model(torch.tensor([prompt]))[:, -1], cfg)[0]
            p2 = next_token_probs(model(torch.tensor([[*prompt, a] for a in range(V)]))[:, -1], cfg)
        return (p1[:, None] * p2).flatten()

    exact = joint(target)
    # the test has power only if the draft's law is far from the target's
    assert 0.5 * (joint(draft) - exact).abs().sum() > 0.2
    g = torch.Generator().manual_seed(0)
    N = 2000  # ~4 tiny forward passes per draw; the rule itself is checked on 6000 draws above
    counts = torch.zeros(V * V)
    for _ in range(N):
        a, b = speculative_decode(target, draft, prompt, cfg, generator=g, num_draft=2)
        counts[a * V + b] += 1
    assert counts[exact == 0].sum() == 0  # top-k removed tokens are never produced
    big = exact * N >= 5  # chi-square wants expected counts >= 5: pool the rare cells into one
    obs, exp = counts[big], exact[big] * N
    if (~big & (exact > 0)).any():
        obs = torch.cat([obs, counts[~big].sum()[None]])
        exp = torch.cat([exp, exact[~big].sum()[None] * N])
    o, e = obs.double().numpy(), exp.double().numpy()
    assert stats.chisquare(o, e * o.sum() / e.sum()).pvalue > 1e-3


def test_speculative_greedy_with_fused_paths():
    from llmkit.infer.fused import enable_fast_decode

    target, draft = tiny_model("llama_gqa", seed=0), tiny_model("mqa_tied", seed=4, n_layers=1)
    want = greedy_uncached(target, PROMPT, 12)
    assert enable_fast_decode(target) and enable_fast_decode(draft)
    cfg = GenerationConfig(max_new_tokens=12, temperature=0)
    assert list(speculative_decode(target, draft, PROMPT, cfg, num_draft=3)) == want
