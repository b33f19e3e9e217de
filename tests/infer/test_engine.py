"""The engine: cached = uncached, batched = one by one, greedy limits of the samplers, seeds, EOS,
stop strings, streaming (UTF-8 safe)."""
from __future__ import annotations

import pytest
import torch
from engine_util import single_thread, ARCHS, greedy_uncached, tiny_model, tiny_tokenizer  # noqa: F401 (autouse fixture)

from llmkit.infer.engine import TextStream, decode_tokens, generate, sequence_logprob
from llmkit.infer.sampling import GenerationConfig

PROMPTS = [[5, 17, 42], [7, 8, 9, 10, 11, 12, 13], [100, 3, 250, 4, 9]]


def _run(model, prompts, cfg, eos=(), seed=None):
    out = [[] for _ in prompts]
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for events in decode_tokens(model, prompts, cfg, eos, gen):
        for i, t in events:
            out[i].append(t)
    return out


@pytest.mark.parametrize("arch", list(ARCHS))
def test_cached_generation_equals_uncached(arch):
    m = tiny_model(arch)
    got = _run(m, [PROMPTS[1]], GenerationConfig(max_new_tokens=10, temperature=0))[0]
    assert got == greedy_uncached(m, PROMPTS[1], 10)


@pytest.mark.parametrize("arch", ["llama_gqa", "alibi", "t5bias", "learned_gelu", "window_local_global", "gemma2_softcap"])
def test_batched_equals_one_by_one(arch):
    m = tiny_model(arch)
    cfg = GenerationConfig(max_new_tokens=9, temperature=0)
    batched = _run(m, PROMPTS, cfg)
    assert batched == [_run(m, [p], cfg)[0] for p in PROMPTS]


def test_rows_leave_the_batch_at_eos():
    m = tiny_model("llama_gqa")
    cfg = GenerationConfig(max_new_tokens=12, temperature=0)
    alone = [_run(m, [p], cfg)[0] for p in PROMPTS]
    eos = alone[0][2]  # row 0 stops after 3 tokens; the others continue in a smaller batch
    batched = _run(m, PROMPTS, cfg, eos=[eos])
    for a, b in zip(alone, batched):
        cut = a.index(eos) + 1 if eos in a else len(a)
        assert b == a[:cut]
    assert len(batched[0]) == 3


def test_temperature_to_zero_and_top_k_one_equal_greedy():
    m = tiny_model("llama_gqa")
    greedy = _run(m, PROMPTS, GenerationConfig(max_new_tokens=8, temperature=0))
    assert _run(m, PROMPTS, GenerationConfig(max_new_tokens=8, temperature=1e-4), seed=1) == greedy
    assert _run(m, PROMPTS, GenerationConfig(max_new_tokens=8, temperature=1.3, top_k=1), seed=2) == greedy
    assert _run(m, PROMPTS, GenerationConfig(max_new_tokens=8, do_sample=False, temperature=0.7), seed=3) == greedy


def test_seeds_reproducible():
    m, tok = tiny_model("llama_gqa"), tiny_tokenizer()
    cfg = GenerationConfig(max_new_tokens=12, temperature=1.0, seed=123)
    a = generate(m, tok, ["The quick", "héllo"], cfg)
    b = generate(m, tok, ["The quick", "héllo"], cfg)
    c = generate(m, tok, ["The quick", "héllo"], cfg.updated(seed=124))
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]


def test_stop_strings_and_streaming():
    m, tok = tiny_model("llama_gqa"), tiny_tokenizer()
    base = generate(m, tok, "The quick brown", GenerationConfig(max_new_tokens=24, temperature=0))
    assert base.finish_reason == "length" and len(base.token_ids) == 24
    text = base.text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), "need a visible stop string"
    deltas = []
    out = generate(m, tok, "The quick brown", GenerationConfig(max_new_tokens=24, temperature=0, stop=[stop]),
                   stream=lambda i, d: deltas.append(d))
    assert out.text == text[:text.index(stop)]
    assert out.finish_reason == "stop" and len(out.token_ids) < 24
    assert "".join(deltas) == out.text
    it = generate(m, tok, ["The quick brown", "héllo"], GenerationConfig(max_new_tokens=10, temperature=0), stream=True)
    pieces = {0: "", 1: ""}
    for i, d in it:
        pieces[i] += d
    full = generate(m, tok, ["The quick brown", "héllo"], GenerationConfig(max_new_tokens=10, temperature=0))
    assert [pieces[0], pieces[1]] == [c.text for c in full]


def test_eos_ends_generation():
    m, tok = tiny_model("llama_gqa"), tiny_tokenizer()
    base = generate(m, tok, "Hello", max_new_tokens=10, temperature=0)
    eos = base.token_ids[4]
    out = generate(m, tok, "Hello", max_new_tokens=10, temperature=0, eos_token_id=eos)
    assert out.token_ids == base.token_ids[:base.token_ids.index(eos) + 1] and out.finish_reason == "stop"


def test_text_stream_is_utf8_safe_and_holds_back_stop_prefixes():
    tok = tiny_tokenizer()
    text = "héllo 世界 🙂 naïve café"
    ids = tok.encode(text)
    assert len(ids) > len(text.split()), "the test needs characters split over several tokens"
    s = TextStream(tok)
    deltas = [s.push(t) for t in ids] + [s.finish()]
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)
    s = TextStream(tok, stop=["ENDX"])
    deltas = [s.push(t) for t in tok.encode("abc END x ENDX tail")]
    assert "".join(deltas) + s.finish() == "abc END x " and s.stopped
    s = TextStream(tok, stop=["ENDX"])
    got = [s.push(t) for t in tok.encode("abc EN")]
    assert "".join(got) == "abc " and s.finish() == "EN"  # held back while it could become ENDX; released at the end


def test_sequence_logprob_matches_manual():
    m = tiny_model("llama_gqa")
    prompt, comp = PROMPTS[0], [1, 2, 3]
    with torch.no_grad():
        lp = m(torch.tensor([prompt + comp]))[0].log_softmax(-1)
    want = sum(float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(comp))
    assert abs(sequence_logprob(m, prompt, comp) - want) < 1e-4


def test_errors_are_clear():
    m = tiny_model("learned_gelu")
    with pytest.raises(ValueError, match="learned positions"):
        generate(m, None, [list(range(10))], max_new_tokens=400)
    with pytest.raises(ValueError, match="tokenizer"):
        generate(m, None, ["text"], max_new_tokens=2)
    with pytest.raises(ValueError, match="empty prompt"):
        _run(m, [[]], GenerationConfig(max_new_tokens=2))
