"""Against transformers: a tiny random LlamaForCausalLM, saved and imported through `llmkit.load`, decodes to the
same tokens as `model.generate` (greedy, left-padded batch, repetition penalty, EOS, beam search)."""
from __future__ import annotations

import os

import pytest
import torch
from engine_util import single_thread  # noqa: F401 (autouse fixture)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import llmkit  # noqa: E402
from llmkit.infer.engine import generate  # noqa: E402
from llmkit.infer.sampling import GenerationConfig  # noqa: E402

PROMPTS = [[5, 17, 42, 7], [9, 10, 11, 12, 13, 14, 15, 16], [100, 3]]
PAD = 0


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   rope_theta=10000.0, tie_word_embeddings=False, pad_token_id=PAD, bos_token_id=1,
                                   eos_token_id=2)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # peaked distributions, so that greedy paths are far from ties
        hf.model.embed_tokens.weight.mul_(30)
    d = tmp_path_factory.mktemp("hf_llama")
    hf.save_pretrained(d)
    ours, _ = llmkit.load(str(d))
    return hf, ours.eval()


def _hf_generate(hf, prompts, **kw):
    """transformers' generate on a left-padded batch; returns the new tokens per row (pads stripped)."""
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, pad_token_id=PAD, **kw)
    return [row[P:].tolist() for row in out]


def _strip(rows, eos):
    """transformers pads finished rows with pad tokens after EOS; cut after the first EOS."""
    return [r[:r.index(eos) + 1] if eos in r else r for r in rows]


def test_greedy_batch_equals_transformers(pair):
    hf, ours = pair
    want = _hf_generate(hf, PROMPTS, do_sample=False, max_new_tokens=16, eos_token_id=None)
    got = generate(ours, None, PROMPTS, GenerationConfig(max_new_tokens=16, temperature=0))
    assert [g.token_ids for g in got] == want


def test_repetition_penalty_and_eos_equal_transformers(pair):
    hf, ours = pair
    base = _hf_generate(hf, PROMPTS[:1], do_sample=False, max_new_tokens=12, eos_token_id=None)[0]
    eos = base[5]
    want = _strip(_hf_generate(hf, PROMPTS, do_sample=False, max_new_tokens=12, repetition_penalty=1.5,
                               eos_token_id=eos), eos)
    got = generate(ours, None, PROMPTS, GenerationConfig(max_new_tokens=12, temperature=0, repetition_penalty=1.5,
                                                          eos_token_id=eos))
    assert [g.token_ids for g in got] == want


@pytest.mark.parametrize("kw", [dict(num_beams=3, length_penalty=1.0, early_stopping=False),
                                dict(num_beams=4, length_penalty=0.5, early_stopping=True, no_repeat_ngram_size=2),
                                dict(num_beams=2, length_penalty=2.0, repetition_penalty=1.3)])
def test_beam_search_equals_transformers(pair, kw):
    hf, ours = pair
    prompt = PROMPTS[1]
    base = _hf_generate(hf, [prompt], do_sample=False, max_new_tokens=10, eos_token_id=None)[0]
    eos = base[3]  # an EOS the beams meet, so finished hypotheses, length penalty and stopping rules matter
    want = _strip(_hf_generate(hf, [prompt], do_sample=False, max_new_tokens=10, eos_token_id=eos, **kw), eos)[0]
    got = generate(ours, None, prompt, GenerationConfig(max_new_tokens=10, eos_token_id=eos, **kw))
    assert got.token_ids == want
