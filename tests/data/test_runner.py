"""`llmkit data clean` end to end on real text (checklist B15): planted copies and near-copies removed,
PII redacted, malformed records rejected with reasons, stats/report/manifest written; identical output
with 1 or 2 workers; a run killed mid-way and resumed equals an uninterrupted run; tag-then-filter."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zstandard

from llmkit.artifacts import verify_manifest
from llmkit.data.runner import clean
from llmkit.data.tagfilter import refilter_dir

from _clean_helpers import CFG, data_bytes, read_out

REPO = Path(__file__).resolve().parents[2]


def test_end_to_end_default_pipeline(reference_run):
    out, stats = reference_run
    recs = read_out(out)
    ids = [r["id"] for r in recs]
    assert not any(i.startswith(("copy", "near")) for i in ids)
    assert {f"ts{i}" for i in range(10)} <= set(ids) and {f"ts{20 + i}" for i in range(10)} <= set(ids)
    assert stats["exact_dedup"]["removed"] == {"exact_duplicate": 10}
    assert stats["minhash_dedup"]["removed"] == {"minhash_near_duplicate": 10}
    pii = next(r for r in recs if r["id"] == "pii")
    assert "<EMAIL>" in pii["text"] and "<PHONE>" in pii["text"] and "jane.roe" not in pii["text"]
    assert next(r for r in recs if r["id"] == "ts3")["src_url"] == "http://ts/3"  # extra fields survive
    assert stats["read"]["removed"] == {"bad_json": 1, "empty": 1, "no_text": 1}
    rejected = [json.loads(x) for p in (out / "rejected").glob("*.jsonl") for x in p.read_text().splitlines()]
    assert sorted(r["reason"] for r in rejected) == ["bad_json", "empty", "no_text"]
    for name, s in stats.items():
        assert s["in"] - s["out"] == sum(s["removed"].values()), name
    names = list(stats)
    for a, b in zip(names, names[1:]):
        assert stats[a]["out"] == stats[b]["in"]
    assert stats["minhash_dedup"]["out"] == len(recs)
    html = (out / "report.html").read_text()
    assert "Removal funnel" in html and "<svg" in html and "exact_duplicate" in html and "language_score" in html
    assert verify_manifest(out) == []
    m = json.loads((out / "manifest.json").read_text())
    assert m["kind"] == "dataset" and m["parents"][0]["path"].endswith("corpus.jsonl") and m["config"]["stages"]
    assert not (out / "_work").exists()


def test_two_workers_same_output(corpus, reference_run, tmp_path):
    out = tmp_path / "w2"
    stats = clean([str(corpus)], out, CFG, workers=2)
    assert data_bytes(out) == data_bytes(reference_run[0])
    assert stats == reference_run[1]


def test_kill_mid_run_then_resume_equals_uninterrupted(corpus, tmp_path):
    # small shards (28 per pass) leave plenty of run after the kill point, even on an idle machine
    ref = tmp_path / "ref"
    ref_stats = clean([str(corpus)], ref, {**CFG, "docs_per_shard": 10}, workers=1)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "llmkit", "data", "clean", str(corpus), "-o", str(out), "--workers", "2",
           "--docs-per-shard", "10"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    markers = out / "completions" / "pass0"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if markers.exists() and len(list(markers.glob("*.json"))) >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and its worker processes
    proc.wait()
    assert not (out / "completions" / "run.json").exists()
    # a corrupted shard must not count as done: its marker's hash no longer matches
    done = sorted(markers.glob("*.json"))
    shard = out / "_work" / "pass0" / f"{done[0].stem}.jsonl.zst"
    shard.write_bytes(shard.read_bytes()[:-7])
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert data_bytes(out) == data_bytes(ref)
    assert json.loads((out / "stats.json").read_text()) == ref_stats
    rej = lambda o: sorted(p.read_text() for p in (o / "rejected").glob("*.jsonl"))  # noqa: E731
    assert rej(out) == rej(ref)


def test_rerun_of_complete_run_and_config_guard(corpus, reference_run):
    out, stats = reference_run
    assert clean([str(corpus)], out, CFG) == stats
    with pytest.raises(ValueError, match="different config"):
        clean([str(corpus)], out, {**CFG, "docs_per_shard": 41})


def test_tag_then_filter_equals_filtering_directly(corpus, tmp_path):
    stages = [{"type": "langid"}, {"preset": "gopher"}, {"type": "fineweb_quality"}]
    tagged = tmp_path / "tagged"
    clean([str(corpus)], tagged, {**CFG, "stages": stages, "mode": "tag"})
    n_all = len(read_out(tagged))
    assert n_all == 150 + 100 + 10 + 10 + 1  # every well-formed record: tag mode drops nothing
    assert all("gopher_quality" in r["metadata"]["attrs"] for r in read_out(tagged))
    new_cfg = {**CFG, "stages": [{"type": "langid"}, {"type": "gopher_repetition"},
                                 {"type": "gopher_quality", "min_words": 150}, {"type": "fineweb_quality"}]}
    stats = refilter_dir(tagged, tmp_path / "refiltered", new_cfg)
    direct = tmp_path / "direct"
    clean([str(corpus)], direct, new_cfg)
    ids_re = sorted(r["id"] for r in read_out(tmp_path / "refiltered"))
    ids_direct = sorted(r["id"] for r in read_out(direct))
    assert ids_re == ids_direct and stats["out"] == len(ids_direct) < n_all
    assert any(k.startswith("gopher_quality:gopher_too_few_words") for k in stats["removed"])


def test_multipass_edit_stages_and_decontamination(corpus, shared_data, tmp_path):
    """Global stages that edit text (CCNet line dedup, C4 3-sentence spans) chained across passes,
    with decontamination in between: same result with 1 and 2 workers, and the edits really happen."""
    gsm = shared_data / "gsm8k" / "test.jsonl"
    question = json.loads(gsm.read_text().splitlines()[7])["question"]
    extra = tmp_path / "extra.jsonl"
    span = "The sky was very blue. Birds sang in the trees. A cat slept on the wall."
    extra.write_text("\n".join(json.dumps(r) for r in [
        {"id": "x1", "text": f"Menu bar text\nFirst unique line here.\n{span} More."},
        {"id": "x2", "text": f"Menu bar text\nSecond unique line here.\nOpening words. {span} Closing words. Final words."},
        {"id": "x3", "text": f"A story begins.\n{question}\nIt ends."}]) + "\n")
    cfg = {**CFG, "stages": [{"type": "line_dedup"}, {"type": "decontaminate", "benchmarks": {"gsm8k": str(gsm)}},
                             {"type": "sentence_dedup"}, {"type": "exact_dedup"}]}
    outs = []
    for w in (1, 2):
        clean([str(extra), str(corpus)], tmp_path / f"o{w}", cfg, workers=w)
        outs.append(tmp_path / f"o{w}")
    assert data_bytes(outs[0]) == data_bytes(outs[1])
    recs = {r["id"]: r["text"] for r in read_out(outs[0])}
    assert recs["x1"].startswith("Menu bar text\nFirst unique line here.") and span in recs["x1"]
    assert "Menu bar text" not in recs["x2"] and "Birds sang" not in recs["x2"] and "Final words." in recs["x2"]
    assert "x3" not in recs  # contaminated
    stats = json.loads((outs[0] / "stats.json").read_text())
    assert stats["decontaminate"]["removed"] == {"contaminated": 1}
    assert stats["line_dedup"]["counters"]["units_removed"] >= 1 and stats["sentence_dedup"]["counters"]["sentences_removed"] >= 3


def test_keep_removed_writes_every_dropped_document(corpus, tmp_path):
    out = tmp_path / "kr"
    stats = clean([str(corpus)], out, {**CFG, "keep_removed": True,
                                       "stages": [{"preset": "gopher"}, {"type": "exact_dedup"}]}, workers=2)
    removed = [json.loads(x) for p in sorted((out / "removed").glob("*.jsonl.zst"))
               for x in zstandard.decompress(p.read_bytes()).decode().splitlines()]
    by_stage = {}
    for r in removed:
        by_stage.setdefault(r["removed_by"], []).append(r)
    assert sorted(r["id"] for r in by_stage["exact_dedup"]) == sorted(f"copy{i}" for i in range(10))
    for name, s in stats.items():
        if name != "read":
            assert len(by_stage.get(name, [])) == sum(s["removed"].values()), name
    assert verify_manifest(out) == []
