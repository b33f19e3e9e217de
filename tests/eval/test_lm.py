"""The model interface: scoring equals a manual log-prob sum; caching/batching change nothing; generation."""
import math
import os

import pytest
import torch

from llmkit.eval import packing
from llmkit.eval.lm import HFLM, LlmkitLM, bits_per_byte, rolling_windows


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


def test_pack_covers_items_once_in_balanced_rows():
    lengths = [1, 40, 3, 3, 17, 2, 60, 5, 5, 8, 9, 30, 2, 2, 11, 12, 13, 25, 1, 4] * 3
    rows = packing.pack(lengths, 64)
    assert sorted(j for r in rows for j in r) == list(range(len(lengths)))
    assert len(rows) == -(-sum(lengths) // 64)
    loads = [sum(lengths[j] for j in r) for r in rows]
    assert loads == sorted(loads, reverse=True) and loads[0] - loads[-1] <= max(lengths)
    assert packing.pack([70, 3], 64) == [[0], [1]]  # an item longer than a row: a row of its own
    assert packing.pack([200], 40) == [[0]]
    assert packing.pack(lengths, None) == [[j] for j in sorted(range(len(lengths)), key=lambda j: -lengths[j])]
    assert packing.pack([], 64) == []


def _check_manual(lm, model, reqs):
    got = lm.loglikelihood(reqs)
    for (c, x), (lp, greedy) in zip(reqs, got):
        ctx, cont = lm.encode_pair(c, x)
        assert lp == pytest.approx(manual_logprob(model, ctx, cont), abs=1e-4)
        argmax = model(torch.tensor([ctx + cont]))[0, len(ctx) - 1:-1].argmax(-1).tolist()
        assert greedy == (argmax == cont)


WORDS = "the cat sat on a mat and then it ran far away over hills to the sea".split()
MANY = [(ctx, " " + " ".join(WORDS[:n])) for ctx in ("Once upon a time there was a story about", "Once upon a",
                                                     "Q: where?\nA:") for n in (1, 2, 3, 7, 12, 17, 5)]


@pytest.mark.parametrize("row_tokens,batch_tokens", [(256, 4096), (16, 4096), (256, 16), (40, 64)])
def test_packed_tree_scoring_equals_manual_sums(tiny, monkeypatch, row_tokens, batch_tokens):
    """Several items per row, each context shared by continuations of very different lengths under the tree
    mask, rows split over batches: every pair still gets its own-sequence log-prob and greedy flag."""
    monkeypatch.setattr(packing, "ROW_TOKENS", row_tokens)
    model, tok = tiny
    _check_manual(LlmkitLM(model, tok, batch_tokens=batch_tokens), model, MANY + REQS)


def test_shared_fewshot_prefix_runs_once_and_stays_exact(tiny, monkeypatch):
    model, tok = tiny
    demo = "Q: what is one plus one?\nA: two\n\nQ: what is two plus two?\nA: four\n\n"
    reqs = [(demo + q, a) for q in ("Q: what is three plus three?\nA:", "Q: what is one plus two?\nA:")
            for a in (" six", " three", " nine and more words")]
    calls = []
    forward = type(model).forward

    def spy(self, ids, **kw):
        calls.append(tuple(ids.shape))
        return forward(self, ids, **kw)

    monkeypatch.setattr(type(model), "forward", spy)
    _check_manual(LlmkitLM(model, tok), model, reqs)
    lm = LlmkitLM(model, tok)
    ctxs = [lm.encode_pair(c, x)[0] for c, x in reqs]
    shared = len(os.path.commonprefix(ctxs))
    assert shared >= len(lm.encode(demo)) - 1
    assert calls[0] == (1, shared)  # the prefix alone, once; then the packed rows
    assert len(calls) == 2 + 2 * len(reqs)  # one batch of packed rows; then two reference calls per pair


def test_slot_position_models_score_one_pair_per_row(tiny):
    """ALiBi biases attention by slot distance, so tree packing would change scores: such models get one pair
    per row and stay exact."""
    from eval_util import tiny_model

    tok = tiny[1]
    model = tiny_model(tok.vocab_size, pos="alibi")
    assert not packing.tree_packing_ok(model.cfg)
    _check_manual(LlmkitLM(model, tok), model, MANY[:8] + REQS)


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
