"""Language ID (B4), the hashed n-gram quality classifier (B2), the n-gram LM perplexity buckets (B3/B5),
keyword lists and boilerplate lines (B7)."""
from __future__ import annotations

import numpy as np
import pytest

from llmkit.data.document import Document
from llmkit.data.keywords import BoilerplateLines, KeywordFilter
from llmkit.data.langid import LanguageID, langid_classify
from llmkit.data.quality import HashedNGramClassifier, NGramLM, Perplexity, QualityClassifier

SENTENCES = {
    "en": "The weather was lovely this morning, so we walked along the river and talked about our plans.",
    "de": "Das Wetter war heute Morgen schön, also gingen wir am Fluss entlang und sprachen über unsere Pläne.",
    "fr": "Il faisait beau ce matin, alors nous avons marché le long de la rivière en parlant de nos projets.",
    "es": "Hacía buen tiempo esta mañana, así que caminamos junto al río y hablamos de nuestros planes.",
}


@pytest.mark.slow  # loads the langid package model the slow way (bz2 + unpickle, ~10 s) as the oracle
def test_langid_matches_langid_package_and_fixtures():
    from langid.langid import LanguageIdentifier, model

    ref = LanguageIdentifier.from_modelstring(model, norm_probs=True)
    for lang, text in SENTENCES.items():
        ours = langid_classify(text)
        assert ours[0] == lang
        theirs = ref.classify(text)
        assert ours[0] == theirs[0] and ours[1] == pytest.approx(theirs[1], abs=1e-6)


def test_langid_stage_threshold_boundary_and_metadata():
    text = "ok fine"  # short text: a middling score
    lang, score = langid_classify(text)
    at = LanguageID(languages=[lang], threshold=score)
    d = Document("1", text)
    assert at(d) is d and d.metadata["language"] == lang
    above = LanguageID(languages=[lang], threshold=score + 1e-6)
    assert above(Document("2", text)) is None and above.stats.removed == {"langid_low_score": 1}
    en_only = LanguageID(languages=["en"])
    assert en_only(Document("3", SENTENCES["de"])) is None and en_only.stats.removed == {"langid_other_language": 1}
    assert LanguageID(languages=None)(Document("4", SENTENCES["fr"])) is not None


def _corpus(shared_data, n=300):
    text = (shared_data / "wikitext-2" / "raw" / "wiki.test.raw").read_text().replace("\r\n", "\n")
    good = [p.strip() for p in text.split("\n") if len(p.split()) > 40][:n]
    rng = np.random.default_rng(0)
    vocab = " ".join(good).split()
    boiler = ["Home | About | Contact | Login", "Click here to subscribe!!! Best deals", "Copyright 2020 all rights reserved",
              "Share on Facebook Tweet Pin Email", "cheap pills buy now free shipping"]
    bad = []
    for i in range(n):  # random web junk: boilerplate lines and word salad
        salad = " ".join(rng.choice(vocab, 40))
        bad.append(f"{boiler[i % 5]} {salad.upper() if i % 3 == 0 else salad} {boiler[(i + 2) % 5]}")
    return good, bad


def _auc(pos, neg):
    pos, neg = np.asarray(pos), np.asarray(neg)
    return (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()


def test_quality_classifier_auc_and_determinism(shared_data, tmp_path):
    good, bad = _corpus(shared_data)
    clf = HashedNGramClassifier().fit(good[:200], bad[:200], epochs=100)
    auc = _auc(clf.predict_proba(good[200:]), clf.predict_proba(bad[200:]))
    assert auc > 0.95, auc
    clf2 = HashedNGramClassifier().fit(good[:200], bad[:200], epochs=100)
    np.testing.assert_array_equal(clf.predict_proba(good[200:]), clf2.predict_proba(good[200:]))
    clf.save(tmp_path / "q.npz")
    st = QualityClassifier(model=str(tmp_path / "q.npz"), threshold=0.5)
    kept = [st(Document(str(i), t)) is not None for i, t in enumerate(good[200:] + bad[200:])]
    assert np.mean(kept[:100]) > 0.9 and np.mean(kept[100:]) < 0.1
    with pytest.raises(FileNotFoundError, match="train-quality"):
        QualityClassifier(model=str(tmp_path / "none.npz"))


def test_ngram_lm_shuffled_text_has_higher_perplexity_and_buckets(shared_data, tmp_path):
    text = (shared_data / "tinystories" / "tinystories_val.txt").read_text()
    stories = [s.strip() for s in text.split("<|endoftext|>") if len(s.split()) > 60]
    lm = NGramLM().fit(stories[:600])
    rng = np.random.default_rng(0)
    held = stories[600:700]
    clean = [lm.perplexity(s) for s in held]
    shuffled = [lm.perplexity(" ".join(rng.permutation(s.split()))) for s in held]
    assert all(c < s for c, s in zip(clean, shuffled))  # paired: every doc
    lp = lm.log_probs(held[0])
    assert np.all(lp < 0)
    cut = lm.fit_cutoffs(held + [" ".join(rng.permutation(s.split())) for s in held])
    assert cut[0] < cut[1]
    lm.save(tmp_path / "lm.npz")
    st = Perplexity(model=str(tmp_path / "lm.npz"), drop_buckets=["tail"])
    pp = np.array([lm.perplexity(t) for t in held])
    buckets = [lm.bucket(p) for p in pp]
    expected = ["head" if p < cut[0] else "middle" if p < cut[1] else "tail" for p in pp]
    assert buckets == expected
    d = Document("x", held[0])
    assert st(d) is d and d.metadata["ppl_bucket"] == expected[0]
    assert st(Document("y", " ".join(rng.permutation(held[1].split())) + " zq xv")) is None


def test_keyword_filter_and_boilerplate_lines(tmp_path):
    wl = tmp_path / "bad.txt"
    wl.write_text("darn\nheck\nbad phrase here\n")
    kf = KeywordFilter(files=[str(wl)])
    assert kf(Document("1", "Well, darn it.")) is None
    assert kf(Document("2", "Darned is not a listed word.")) is not None  # whole words only
    assert kf(Document("3", "There is a BAD PHRASE HERE today")) is None
    kf2 = KeywordFilter(words=["heck"], max_hits=None, max_fraction=0.25)
    assert kf2(Document("4", "heck heck fine words here")) is None and kf2(Document("5", "heck one two three four")) is not None
    bp = BoilerplateLines()
    d = Document("6", "Real content line one.\nWe use cookies to improve your experience.\nAll rights reserved.\nMore real content.")
    assert bp(d) is d and d.text == "Real content line one.\nMore real content."
    assert bp.stats.counters["lines_removed"] == 2
    strict = BoilerplateLines(max_removed_frac=0.05)
    assert strict(Document("7", "Good text here and more.\nClick here to continue")) is None


def test_langid_batch_equals_single_and_stage_batch():
    from llmkit.data.langid import langid_classify_batch

    texts = list(SENTENCES.values()) + ["猫はテーブルの上で寝ています。", "ok", "x" * 3000]
    assert langid_classify_batch(texts) == [langid_classify(t) for t in texts]
    st = LanguageID(languages=["en", "de"])
    docs = [Document(str(i), t) for i, t in enumerate(texts)]
    kept = st.run_batch(docs)
    assert [d.id for d in kept] == [str(i) for i, t in enumerate(texts) if langid_classify(t[:2000])[0] in ("en", "de")
                                    and langid_classify(t[:2000])[1] >= 0.65]
    assert st.stats.n_in == len(texts) and st.stats.n_out == len(kept)
