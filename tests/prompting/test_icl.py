"""ICL: retrievers find true neighbours, MMR diversifies, ordering, prompt budget, contextual calibration."""
import numpy as np
import pytest

from llmkit.eval.lm import LM, LlmkitLM
from llmkit.prompting import icl

POOL = ["the cat sat on the mat", "a dog chased the cat", "stock markets fell sharply today",
        "the cat sat on the red mat", "interest rates and stock prices", "a cat and a dog played"]


def test_bm25_matches_hand_computation():
    bm = icl.BM25(POOL)
    s = bm.scores("cat mat")
    # hand-computed Okapi BM25 for doc 0 (k1=1.5, b=0.75, Lucene idf)
    n, avg = len(POOL), np.mean([len(d.split()) for d in POOL])
    def idf(w):
        df = sum(w in d.split() for d in POOL)
        return np.log((n - df + 0.5) / (df + 0.5) + 1)
    L = len(POOL[0].split())
    want = sum(idf(w) * 1 * 2.5 / (1 + 1.5 * (1 - 0.75 + 0.75 * L / avg)) for w in ("cat", "mat"))
    assert s[0] == pytest.approx(want)
    assert icl.select(POOL, "cat mat", 2, "bm25") == [0, 3]


def test_knn_returns_true_nearest_neighbours():
    emb = icl.hashed_embedder()
    vecs = emb(POOL)
    q = emb(["stock prices fell"])[0]
    truth = list(np.argsort(-(vecs @ q), kind="stable")[:2])
    assert icl.select(POOL, "stock prices fell", 2, "knn") == truth
    assert set(truth) == {2, 4}


def test_mmr_trades_relevance_for_diversity():
    # docs 0 and 3 are near-duplicates; with lambda=0.5 MMR picks one of them and then something else
    knn = icl.select(POOL, "the cat sat on the mat", 2, "knn")
    mm = icl.select(POOL, "the cat sat on the mat", 2, "mmr", lam=0.5)
    assert set(knn) == {0, 3} and mm[0] == knn[0] and mm[1] not in (0, 3)
    emb = icl.hashed_embedder()
    v = emb(POOL)
    redundancy = lambda idx: float(v[idx[0]] @ v[idx[1]])  # noqa: E731
    assert redundancy(mm) < redundancy(knn)


def test_selection_excludes_the_query_and_random_is_seeded():
    assert 3 not in icl.select(POOL, POOL[3], 3, "knn", exclude=3)
    assert icl.select(POOL, "x", 3, "random", seed=5) == icl.select(POOL, "x", 3, "random", seed=5)
    with pytest.raises(ValueError, match="unknown selection"):
        icl.select(POOL, "x", 1, "magic")


def test_similarity_order_puts_most_similar_last():
    idx = icl.order([2, 0, 1], POOL, "the cat sat on the mat", "similarity")
    assert idx[-1] == 0 and idx[0] == 2


def test_prompt_budget_keeps_query_drops_oldest_demos():
    demos = ["D1 " * 5, "D2 " * 5, "D3 " * 5]
    count = lambda s: len(s.split())  # noqa: E731
    p = icl.build_prompt(demos, "QUERY", max_tokens=12, count=count)
    assert p.endswith("QUERY") and "D1" not in p and "D2" in p and "D3" in p
    assert icl.build_prompt(demos, "QUERY " * 50, max_tokens=5, count=count).count("QUERY") == 50
    assert icl.build_prompt(["a", "b"], "q", description="Task.\n") == "Task.\na\n\nb\n\nq"


class BiasedLM(LM):
    """Prefers ' positive' by a fixed log-odds of 2 whatever the input, plus a real signal: 'good' / 'bad' add 1.5."""

    def loglikelihood(self, requests):
        out = []
        for ctx, cont in requests:
            q = ctx.rsplit("Input:", 1)[-1]
            pos = cont == " positive"
            score = 2.0 * pos + 1.5 * (pos and "good" in q) + 1.5 * (not pos and "bad" in q)
            out.append((score, False))
        return out


def test_contextual_calibration_makes_content_free_uniform():
    lm = BiasedLM()
    make = lambda x: f"Input: {x}\nSentiment:"  # noqa: E731
    labels = [" positive", " negative"]
    p_cf = icl.content_free_probs(lm, make, labels)
    assert p_cf[0] == pytest.approx(1 / (1 + np.exp(-2)))
    assert np.allclose(icl.calibrate(p_cf, p_cf), [0.5, 0.5])
    raw = icl.label_probs(lm, [make("a bad film"), make("a good film")], labels)
    cal = icl.calibrate(raw, p_cf)
    assert raw[0].argmax() == 0  # the bias says positive for the bad film
    assert cal[0].argmax() == 1 and cal[1].argmax() == 0  # calibrated: negative, positive


def test_global_entropy_prefers_balanced_predictions():
    perms = icl.permutations([0, 1, 2], limit=6)
    def label_probs(perm):  # only the order ending in 2 gives balanced predictions on 4 probes
        if perm[-1] == 2:
            return np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
        return np.array([[0.9, 0.1]] * 4)
    assert icl.order_by_global_entropy(perms, label_probs)[-1] == 2


def test_lm_embedder_and_selection_with_a_real_model(tiny):
    model, tok = tiny
    emb = icl.lm_embedder(model, tok)
    v = emb(POOL[:3])
    assert v.shape == (3, model.cfg.d_model) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert icl.select(POOL, POOL[1], 1, "knn", embed=emb) == [1]
    p = icl.label_probs(LlmkitLM(model, tok), ["Input: good\nSentiment:"], [" positive", " negative"])
    assert p.shape == (1, 2) and p.sum() == pytest.approx(1)
