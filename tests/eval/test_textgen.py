"""BLEU and ROUGE equal sacrebleu / rouge-score on the same pairs."""
import pytest

from llmkit.eval import textgen

HYPS = ["The cat is on the mat.", "There is a cat on the mat, isn't there?", "Hello world -- 3-4 times & more",
        "the quick brown fox jumps over the lazy dog", "A completely different sentence."]
REFS = ["The cat sat on the mat.", "A cat is on the mat.", "Hello, world: 3-4 times and more!",
        "the quick brown fox jumped over the lazy dog", "Nothing in common here at all."]


def test_bleu_matches_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    ref = sacrebleu.corpus_bleu(HYPS, [REFS]).score
    assert textgen.corpus_bleu(HYPS, REFS) == pytest.approx(ref, abs=1e-6)
    for h, r in zip(HYPS[:4], REFS[:4]):
        assert textgen.tokenize_13a(h) == sacrebleu.tokenizers.tokenizer_13a.Tokenizer13a()(h).split()
    assert textgen.corpus_bleu(["x y"], ["a b c"]) == 0.0


def test_rouge_matches_rouge_score():
    rs = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rs.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    for h, r in zip(HYPS, REFS):
        want = scorer.score(r, h)
        assert textgen.rouge_n(h, r, 1) == pytest.approx(want["rouge1"].fmeasure)
        assert textgen.rouge_n(h, r, 2) == pytest.approx(want["rouge2"].fmeasure)
        assert textgen.rouge_l(h, r) == pytest.approx(want["rougeL"].fmeasure)
