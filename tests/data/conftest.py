"""Fixtures for the data-cleaning tests: a real-text corpus with planted duplicates, PII and malformed
records, and one reference run of the default pipeline shared by the runner and Ray tests."""
from __future__ import annotations

import json

import pytest

from llmkit.data.document import Document
from llmkit.data.filters import C4Quality, GopherQuality, GopherRepetition
from llmkit.data.runner import clean

from _clean_helpers import CFG


@pytest.fixture(scope="session")
def corpus(shared_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    text = (shared_data / "tinystories" / "tinystories_val.txt").read_text()
    keep = lambda t: all(st.apply(Document("x", t)) is None for st in (GopherRepetition(), GopherQuality(), C4Quality()))  # noqa: E731
    # stories the quality filters keep, so that what removes the planted copies is dedup
    stories = [s.strip() for s in text.split("<|endoftext|>") if len(s.split()) > 120 and keep(s.strip())][:170]
    wiki = (shared_data / "wikitext-2" / "raw" / "wiki.test.raw").read_text().replace("\r\n", "\n")
    paras = [p.strip() for p in wiki.split("\n") if len(p.split()) > 80][:100]
    recs = [{"id": f"ts{i}", "text": s, "src_url": f"http://ts/{i}"} for i, s in enumerate(stories[:150])]
    recs += [{"id": f"wk{i}", "text": p} for i, p in enumerate(paras)]
    recs += [{"id": f"copy{i}", "text": stories[i]} for i in range(10)]                       # exact copies
    recs += [{"id": f"near{i}", "text": stories[20 + i].replace(".", "!", 1) + " The end."} for i in range(10)]
    pii = " Email me at jane.roe@mail.com or call +44 20 7946 0958."
    carrier = next(t for t in stories[150:] if keep(t + pii))  # not in the corpus, or dedup would remove it
    recs.insert(5, {"id": "pii", "text": carrier + pii})
    lines = [json.dumps(r) for r in recs]
    lines[30:30] = ["{broken json", "", json.dumps({"id": "notext", "body": "x"})]
    path = d / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def reference_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    stats = clean([str(corpus)], out, CFG, workers=1)
    return out, stats


