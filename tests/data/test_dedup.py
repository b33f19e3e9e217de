"""Exact, line/paragraph, C4 3-sentence and MinHash dedup stages (checklist B8-B10), and benchmark
decontamination with GSM8K / HellaSwag items planted in real text."""
from __future__ import annotations

import json

import pytest

from llmkit.data.decontam import Decontaminate, NGramIndex, load_eval_texts
from llmkit.data.dedup import ExactDedup, LineDedup, MinHashDedup, SentenceSpanDedup
from llmkit.data.document import Document


def run_global(stage, texts):
    docs = [Document(str(i), t) for i, t in enumerate(texts)]
    decisions = stage.decide(stage.keys_batch(docs))
    return [stage.run_decided(d, dec) for d, dec in zip(docs, decisions)]


def test_exact_dedup_normalised_first_kept():
    out = run_global(ExactDedup(), ["Hello, World! 2023", "hello world 1999", "Héllo world 0000", "other"])
    assert [d is not None for d in out] == [True, False, False, True]
    out = run_global(ExactDedup(normalize=False), ["Hello, World!", "hello world"])
    assert all(d is not None for d in out)


def test_line_dedup_ccnet_style():
    st = LineDedup()
    out = run_global(st, ["menu\nA unique first line.\nfooter text", "menu\nAnother unique line.\nFOOTER text!", "menu\nfooter text"])
    assert out[0].text == "menu\nA unique first line.\nfooter text"
    assert out[1].text == "Another unique line."
    assert out[2] is None and st.stats.removed == {"line_dedup_empty": 1}
    out = run_global(LineDedup(unit="paragraph"), ["p one\n\np two", "p two\n\np three"])
    assert out[1].text == "p three"


def test_c4_three_sentence_span_survives_only_in_first():
    span = "The sky was very blue. Birds sang in the trees. A cat slept on the wall."
    a = f"Alpha starts here. {span} Alpha ends here."
    b = f"Beta opens the text. {span} Beta keeps going. Beta has more. Beta is done."
    st = SentenceSpanDedup()
    out = run_global(st, [a, b])
    assert out[0].text == a
    assert span not in out[1].text and "Beta opens the text." in out[1].text and "Beta is done." in out[1].text
    assert "Birds sang" not in out[1].text
    short = run_global(SentenceSpanDedup(), [a, f"Gamma. {span}"])
    assert short[1] is None  # fewer than 3 sentences left


def test_minhash_stage_keeps_one_per_cluster(shared_data):
    text = (shared_data / "tinystories" / "tinystories_val.txt").read_text()
    stories = [s.strip() for s in text.split("<|endoftext|>") if len(s.split()) > 150][:50]
    near = stories[3].replace(".", "!", 1)
    st = MinHashDedup()
    out = run_global(st, stories + [stories[7], near, near + " The end."])
    kept = [d is not None for d in out]
    assert kept[:50] == [True] * 50 and kept[50:] == [False, False, False]
    assert st.stats.removed == {"minhash_near_duplicate": 3}


def test_eval_loaders_real_formats(shared_data):
    gsm = load_eval_texts(shared_data / "gsm8k" / "test.jsonl")
    assert len(gsm) == 1319 and "Janet" in gsm[0]
    hs = load_eval_texts(shared_data / "hellaswag" / "hellaswag_val_full.txt.bz2")
    assert len(hs) == 10042 and hs[0].startswith("A man is sitting on a roof. he starts pulling up roofing")


def test_planted_benchmark_items_flagged_near_miss_not(shared_data):
    gsm_path = shared_data / "gsm8k" / "test.jsonl"
    hs_path = shared_data / "hellaswag" / "hellaswag_val_full.txt.bz2"
    st = Decontaminate(benchmarks={"gsm8k": str(gsm_path), "hellaswag": str(hs_path)})
    text = (shared_data / "tinystories" / "tinystories_val.txt").read_text()
    stories = [s.strip() for s in text.split("<|endoftext|>") if s.strip()][:60]
    q = [json.loads(line)["question"] for line in gsm_path.read_text().splitlines()[100:110]]
    hs = load_eval_texts(hs_path)[500:510]
    planted = [f"{stories[i]}\n\n{q[i]}\n\n{stories[i + 20]}" for i in range(10)]
    planted += [f"{stories[i + 30]} {hs[i]}" for i in range(10)]

    def paraphrase(t):  # change every 6th word: no 13-gram survives
        w = t.split()
        return " ".join("xx" if i % 6 == 5 else x for i, x in enumerate(w))

    near_miss = [f"{stories[i]}\n{paraphrase(q[i])}" for i in range(10)]
    flags = [st(Document(str(i), t)) is None for i, t in enumerate(planted + near_miss + stories)]
    assert flags[:20] == [True] * 20
    assert not any(flags[20:])
    d = Document("x", planted[0])
    Decontaminate(benchmarks={"gsm8k": str(gsm_path)}, mode="tag")(d)
    assert d.metadata["contamination"]["gsm8k"] >= 1 and d.metadata["attrs"]["decontaminate"]["reason"] == "contaminated"


def test_ngram_index_short_items_and_errors(tmp_path):
    idx = NGramIndex(n=13, min_words=5)
    idx.add("tiny", ["what is the capital of france"])  # 6 words: indexed whole
    assert idx.hits("Quiz: What is the capital of France? Paris.") == {"tiny": 1}
    assert idx.hits("what is the capital of spain") == {}
    with pytest.raises(FileNotFoundError, match="not found"):
        Decontaminate(benchmarks={"x": str(tmp_path / "missing.jsonl")})
