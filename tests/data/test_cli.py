"""`llmkit data` CLI: clean with a YAML config and overrides, train-quality / train-lm, then a tag run
re-filtered with `llmkit data filter`; malformed configs give errors that say what to do."""
from __future__ import annotations

import json

import pytest
import yaml

from llmkit.data.cli import main

from _clean_helpers import read_out


@pytest.fixture
def texts(shared_data, tmp_path):
    ts = (shared_data / "tinystories" / "tinystories_val.txt").read_text()
    stories = [s.strip() for s in ts.split("<|endoftext|>") if len(s.split()) > 80][:120]
    wiki = (shared_data / "wikitext-2" / "raw" / "wiki.test.raw").read_text().replace("\r\n", "\n")
    paras = [p.strip() for p in wiki.split("\n") if len(p.split()) > 60][:60]
    (tmp_path / "pos.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in stories[:60]))
    (tmp_path / "neg.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paras[:40]))
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n"
                                               for i, t in enumerate(stories[60:] + paras[40:])))
    return tmp_path


def test_clean_filter_train_commands(texts, capsys):
    t = texts
    assert main(["train-quality", "--positive", str(t / "pos.jsonl"), "--negative", str(t / "neg.jsonl"),
                 "--epochs", "60", "-o", str(t / "q.npz")]) == 0
    assert main(["train-lm", "--text", str(t / "pos.jsonl"), "--cutoff-sample", str(t / "in.jsonl"), "-o", str(t / "lm.npz")]) == 0
    cfg = {"stages": [{"type": "langid", "languages": ["en"]},
                      {"type": "quality_classifier", "model": str(t / "q.npz"), "threshold": 0.5},
                      {"type": "perplexity", "model": str(t / "lm.npz")},
                      {"type": "pii", "policy": "mask"}],
           "docs_per_shard": 25}
    (t / "p.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["clean", str(t / "in.jsonl"), "-o", str(t / "tagged"), "--config", str(t / "p.yaml"),
                 "--mode", "tag", "--set", "stages.0.threshold=0.5", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "quality_classifier" in out and "report.html" in out
    recs = read_out(t / "tagged")
    assert len(recs) == 80 and all("quality_score" in r["metadata"] and "ppl_bucket" in r["metadata"] for r in recs)
    buckets = {r["metadata"]["ppl_bucket"] for r in recs}
    assert buckets == {"head", "middle", "tail"}
    # re-judge the stored scores: keep only TinyStories-like text (the classifier's positives)
    assert main(["filter", str(t / "tagged"), "--config", str(t / "p.yaml"), "--set", "stages.1.threshold=0.9",
                 "-o", str(t / "filtered")]) == 0
    kept = read_out(t / "filtered")
    ids = {r["id"] for r in kept}
    assert 0 < len(kept) < 80 and sum(int(i[1:]) < 60 for i in ids) > 0.8 * len(ids)
    stats = json.loads((t / "filtered" / "stats.json").read_text())["refilter"]
    assert stats["out"] == len(kept) and "quality_classifier:quality_low_score" in stats["removed"]


def test_cli_errors(tmp_path):
    assert main(["nope"]) == 2
    (tmp_path / "bad.yaml").write_text("just: text\n")
    with pytest.raises(ValueError, match="stages"):
        main(["clean", str(tmp_path / "bad.yaml"), "-o", str(tmp_path / "o"), "--config", str(tmp_path / "bad.yaml")])
    (tmp_path / "x.jsonl").write_text('{"text": "hi"}\n')
    (tmp_path / "s.yaml").write_text("stages:\n  - type: no_such_stage\n")
    with pytest.raises(ValueError, match="unknown stage type"):
        main(["clean", str(tmp_path / "x.jsonl"), "-o", str(tmp_path / "o2"), "--config", str(tmp_path / "s.yaml")])
