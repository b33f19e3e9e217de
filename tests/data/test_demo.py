"""The `make demo` data step: stdlib docstrings + planted noise, cleaned by the default pipeline."""
from __future__ import annotations

import json

import zstandard

from llmkit.data import demo


def test_demo_removes_what_was_planted(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "MAX_FILES", 120)  # a smaller slice of the stdlib keeps the test short
    out = demo.run(tmp_path, workers=1)
    st = out["stats"]
    assert st["read"]["removed"] == {"bad_json": 1, "empty": 1, "invalid_utf8": 1}
    assert st["langid"]["removed"]["langid_other_language"] >= 2  # the German and French pages
    assert st["exact_dedup"]["removed"]["exact_duplicate"] >= out["planted"]["exact_copies"]
    assert st["pii"]["counters"]["redacted_email"] >= 1 and st["pii"]["counters"]["redacted_phone"] >= 1
    recs = [json.loads(x) for p in sorted((tmp_path / "clean" / "data").glob("*.zst"))
            for x in zstandard.decompress(p.read_bytes()).decode().splitlines()]
    ids = {r["id"] for r in recs}
    assert not any(i.startswith(("copy-", "near-", "german", "french", "lorem", "boilerplate")) for i in ids)
    pii = next(r for r in recs if r["id"] == "pii-1")
    assert "<EMAIL>" in pii["text"] and "<IP>" in pii["text"] and "10.0.0.7" in pii["text"]
