"""The model interface: scoring equals a manual log-prob sum; caching/batching change nothing; generation."""
import math

import pytest
import torch

from llmkit.eval import lm as lm_mod
from llmkit.eval.lm import HFLM, LlmkitLM, bits_per_byte, length_buckets, rolling_windows


def manual_logprob(model, ctx, cont):
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        lp = model(ids)[0].float().log_softmax(-1)
    return sum(float(lp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


REQS = [("Question: What is 2 + 3?\nAnswer:", " 5"), ("Question: What is 2 + 3?\nAnswer:", " 42"),
        ("Question: What is 2 + 3?\nAnswer:", " The quick brown fox"), ("The quick brown", " fox jumps"),
        ("Paris is the capital of", " France."), ("", "heads tails"), ("A man ", "is sitting")]


def test_loglikelihood_equals_manual_sum(tiny):
    model, tok = tiny
    lm = LlmkitLM(model, tok)
    got = lm.loglikelihood(REQS)
    for (c, x), (lp, greedy) in zip(REQS, got):
        ctx, cont = lm.encode_pair(c, x)
        assert lp == pytest.approx(manual_logprob(model, ctx, cont), abs=1e-4)
        ids = torch.tensor([ctx + cont])
        argmax = model(ids)[0, len(ctx) - 1:-1].argmax(-1).tolist()
        assert greedy == (argmax == cont)


def test_encode_pair_follows_lm_eval(tiny):
    _, tok = tiny
    lm = LlmkitLM(tiny[0], tok)
    ctx, cont = lm.encode_pair("Answer: ", "5")  # trailing space moves to the continuation
    assert ctx == tok.encode("Answer:") and cont == tok.encode("Answer: 5")[len(ctx):]
    assert lm.encode_pair("", "x")[0] == [tok.bos_token_id]


@pytest.mark.parametrize("batch_tokens", [8, 64, 100000])
def test_batching_and_prefix_cache_do_not_change_scores(tiny, batch_tokens):
    model, tok = tiny
    ref = LlmkitLM(model, tok, batch_tokens=1).loglikelihood(REQS)  # one context group per batch
    got = LlmkitLM(model, tok, batch_tokens=batch_tokens).loglikelihood(REQS)
    for (a, ga), (b, gb) in zip(ref, got):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


def test_length_buckets_cover_rows_once_and_bound_padding():
    lengths = [1, 40, 3, 3, 17, 2, 60, 5, 5, 8, 9, 30, 2, 2, 11, 12, 13, 25, 1, 4] * 3
    rows = list(range(len(lengths)))
    buckets = length_buckets(rows, lambda r: lengths[r], max_rows=10)
    assert sorted(r for b in buckets for r in b) == rows
    for b in buckets:
        assert len(b) <= 10
        real, padded = sum(lengths[r] for r in b), len(b) * max(lengths[r] for r in b)
        if len(b) > lm_mod.MIN_BUCKET:  # a bucket grows past MIN_BUCKET only while its padding stays in bounds
            assert padded <= lm_mod.BUCKET_SLACK * real
    assert length_buckets([], len) == []


@pytest.mark.parametrize("min_bucket,batch_tokens", [(1, 4096), (1, 16), (8, 4096)])
def test_length_bucketed_continuations_equal_manual_sums(tiny, monkeypatch, min_bucket, batch_tokens):
    """Many continuations of very different lengths per context: each bucket runs on its own copy of the
    context cache rows (left-padded contexts, shared prefix) and must still give the exact manual sums."""
    monkeypatch.setattr(lm_mod, "MIN_BUCKET", min_bucket)
    model, tok = tiny
    lm = LlmkitLM(model, tok, batch_tokens=batch_tokens)
    words = "the cat sat on a mat and then it ran far away over hills to the sea".split()
    reqs = [(ctx, " " + " ".join(words[:n])) for ctx in ("Once upon a time there was a story about", "Once upon a",
                                                          "Q: where?\nA:") for n in (1, 2, 3, 7, 12, 17, 5)]
    got = lm.loglikelihood(reqs)
    for (c, x), (lp, greedy) in zip(reqs, got):
        ctx, cont = lm.encode_pair(c, x)
        assert lp == pytest.approx(manual_logprob(model, ctx, cont), abs=1e-4)
        argmax = model(torch.tensor([ctx + cont]))[0, len(ctx) - 1:-1].argmax(-1).tolist()
        assert greedy == (argmax == cont)


def test_hf_adapter_matches_llmkit_on_the_same_weights(tiny):
    transformers = pytest.importorskip("transformers")
    model, tok = tiny
    cfg = model.cfg
    hf_cfg = transformers.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=model.layers[0].mlp.up.out_features,
                                      num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                                      num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_seq_len,
                                      rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    sd = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight}
    for i, blk in enumerate(model.layers):
        p = f"model.layers.{i}."
        sd |= {p + "input_layernorm.weight": blk.attn_norm.weight, p + "post_attention_layernorm.weight": blk.mlp_norm.weight}
        for n in "qkvo":
            sd[p + f"self_attn.{n}_proj.weight"] = getattr(blk.attn, n).weight
        for n in ("gate", "up", "down"):
            sd[p + f"mlp.{n}_proj.weight"] = getattr(blk.mlp, n).weight
    sd["lm_head.weight"] = model.lm_head.weight if model.lm_head is not None else model.embed.weight
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    a = LlmkitLM(model, tok).loglikelihood(REQS)
    b = HFLM(hf, tok, max_length=128).loglikelihood(REQS)
    for (x, _), (y, _) in zip(a, b):
        assert x == pytest.approx(y, abs=1e-3)
    ga = LlmkitLM(model, tok).generate(["The quick", "Paris is the capital of"], max_new_tokens=6)
    gb = HFLM(hf, tok, max_length=128).generate(["The quick", "Paris is the capital of"], max_new_tokens=6)
    assert ga == gb


def test_rolling_windows_cover_every_token_once():
    toks = list(range(100, 123))
    for stride in (4, 8, 10):
        pairs = rolling_windows(toks, 0, 10, stride)
        assert sum((c for _, c in pairs), []) == toks
        assert all(len(c) + len(x) <= 11 for c, x in pairs)
        assert pairs[0][0] == [0]


def test_perplexity_is_exp_mean_nll_by_hand(tiny):
    model, tok = tiny
    lm = LlmkitLM(model, tok, max_length=8)
    text = "The quick brown fox jumps over the lazy dog. Paris is the capital of France."
    ids = lm.encode(text)
    assert len(ids) > 16  # at least three windows
    (lp, n), = lm.loglikelihood_rolling([text])
    # chunks of 8 new tokens; as in lm-eval's rolling windows each window is filled up to 8 + 1 tokens
    # with the preceding tokens (BOS before the first token)
    seq = [tok.bos_token_id] + ids
    manual = sum(manual_logprob(model, seq[max(0, min(k + 8, len(ids)) - 8):k + 1], ids[k:k + 8])
                 for k in range(0, len(ids), 8))
    assert n == len(ids) and lp == pytest.approx(manual, abs=1e-4)
    assert math.exp(-lp / n) == pytest.approx(math.exp(-manual / len(ids)), rel=1e-4)
    assert bits_per_byte(lp, len(text.encode())) == pytest.approx(-manual / math.log(2) / len(text.encode()), rel=1e-6)


def test_generation_greedy_equals_argmax_loop_and_sampling_is_seeded(tiny):
    model, tok = tiny
    lm = LlmkitLM(model, tok)
    prompts = ["The quick", "Question: What is 2 + 3?\nAnswer:"]
    out = lm.generate(prompts, max_new_tokens=5)
    for p, o in zip(prompts, out):
        ids = lm.encode(p)
        for _ in range(5):
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            ids.append(nxt)
        assert o == tok.decode(ids[len(lm.encode(p)):])
    s1 = lm.generate(prompts, max_new_tokens=5, temperature=1.0, seed=3)
    assert s1 == lm.generate(prompts, max_new_tokens=5, temperature=1.0, seed=3)
    assert lm.generate(prompts, max_new_tokens=5, stop=[" "])[0].find(" ") == -1


def test_shared_few_shot_prefix_is_computed_once_and_changes_nothing(tiny):
    model, tok = tiny
    prefix = "Question: What is 2 + 3?\nAnswer: 5\n\nThe quick brown fox jumps over the lazy dog.\n\n"
    reqs = [(prefix + q, c) for q in ("Paris is the capital of", "A man", "The answer is") for c in (" France.", " 42")]
    lm = LlmkitLM(model, tok)
    calls = []
    hook = model.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape))
    try:
        got = lm.loglikelihood(reqs)
    finally:
        hook.remove()
    assert calls[0][0] == 1 and calls[0][1] >= len(lm.encode(prefix)) - 1  # the prefix ran once, batch 1
    for (c, x), (lp, _) in zip(reqs, got):
        ctx, cont = lm.encode_pair(c, x)
        assert lp == pytest.approx(manual_logprob(model, ctx, cont), abs=1e-4)
