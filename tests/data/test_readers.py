"""Readers (checklist B1): every format round-trips ids and extra fields; malformed records are
rejected with a reason, never raised."""
from __future__ import annotations

import gzip
import json

import pytest
import zstandard

from llmkit.data.document import Document, Rejected
from llmkit.data.readers import expand_inputs, read_any

RECS = [{"id": "a", "text": "first doc", "url": "http://a", "score": 1}, {"id": "b", "text": "second doc", "tags": ["x"]}]


def _docs(path, fmt=None, **kw):
    fmt = fmt or expand_inputs([str(path)])[0][1]
    return [x for x in read_any(str(path), fmt, **kw) if x is not None]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_jsonl_compressions_keep_ids_and_extra_fields(tmp_path, suffix):
    data = "".join(json.dumps(r) + "\n" for r in RECS).encode()
    path = tmp_path / f"in{suffix}"
    path.write_bytes(gzip.compress(data) if suffix.endswith("gz") else zstandard.compress(data) if suffix.endswith("zst") else data)
    docs = _docs(path)
    assert [d.id for d in docs] == ["a", "b"]
    assert docs[0].to_record() == {"url": "http://a", "score": 1, "id": "a", "text": "first doc", "source": path.name}
    assert Document.from_record(docs[1].to_record()).to_record() == docs[1].to_record()


def test_malformed_records_rejected_with_reason(tmp_path):
    path = tmp_path / "bad.jsonl"
    big = json.dumps({"text": "x" * 2000})
    path.write_bytes(b'{"text": "ok"}\n{not json\n\n' + b'{"text": "\xff\xfe bad utf8"}\n'
                     + b'{"text": ""}\n{"title": "no text"}\n[1, 2]\n' + big.encode() + b"\n")
    items = _docs(path, max_bytes=1000)
    assert isinstance(items[0], Document)
    assert [r.reason for r in items[1:]] == ["bad_json", "empty", "invalid_utf8", "empty", "no_text", "bad_json", "oversized"]
    assert all(isinstance(r, Rejected) and r.where.startswith(str(path)) for r in items[1:])


def test_text_folder_separator_code_tree_json_array(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text("story one<|endoftext|>story two\n")
    (tmp_path / "t" / "b.md").write_text("# notes\nbody")
    (tmp_path / "t" / "m.py").write_text("def f():\n    return 1\n")
    files = expand_inputs([str(tmp_path / "t")])
    assert [f for _, f in files] == ["text", "text"]  # code only with code=True
    docs = [d for p, f in files for d in read_any(p, f, separator="<|endoftext|>")]
    assert [d.text for d in docs] == ["story one", "story two", "# notes\nbody"]
    code = [f for p, f in expand_inputs([str(tmp_path / "t")], code=True) if f == "code"]
    assert code == ["code"]
    (tmp_path / "alpaca.json").write_text(json.dumps([{"instruction": "Say hi", "input": "", "output": "hi"}]))
    (d,) = _docs(tmp_path / "alpaca.json")
    assert d.text == "Say hi\n\nhi" and d.metadata["_extra"]["output"] == "hi"
    (tmp_path / "data.xyz").write_text("x")
    with pytest.raises(ValueError, match="unknown format"):
        expand_inputs([str(tmp_path / "data.xyz")])
    with pytest.raises(FileNotFoundError):
        expand_inputs([str(tmp_path / "missing.xyz")])


def test_parquet_and_datasets_folder(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"id": "p1", "text": "parquet text", "lang": "en"}]), tmp_path / "x.parquet")
    (d,) = _docs(tmp_path / "x.parquet")
    assert d.id == "p1" and d.to_record()["lang"] == "en"
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"text": "hf one"}, {"text": "hf two"}]).save_to_disk(str(tmp_path / "ds"))
    assert [x.text for x in _docs(tmp_path / "ds")] == ["hf one", "hf two"]


HTML = """<html><head><title>T</title></head><body><nav>Home | About | Contact</nav>
<article><h1>Rivers of Europe</h1><p>The Danube is the second-longest river in Europe, flowing through ten
countries before it reaches the Black Sea. It has been a major trade route for centuries.</p>
<p>Its basin covers parts of nineteen countries and supports a large variety of wildlife and plant species.</p></article>
<footer>Copyright 2024. All rights reserved.</footer></body></html>"""


def test_html_and_warc_main_text(tmp_path):
    (tmp_path / "p.html").write_text(HTML)
    (d,) = _docs(tmp_path / "p.html")
    assert "Danube is the second-longest river" in d.text and "Home | About" not in d.text
    body = HTML.encode()
    http = b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + body
    def rec(kind, payload, uri):
        head = (f"WARC/1.0\r\nWARC-Type: {kind}\r\nWARC-Target-URI: {uri}\r\nWARC-Date: 2024-01-01T00:00:00Z\r\n"
                f"WARC-Record-ID: <urn:uuid:{abs(hash(uri)) % 10**8}>\r\nContent-Length: {len(payload)}\r\n\r\n").encode()
        return head + payload + b"\r\n\r\n"
    warc = rec("warcinfo", b"software: test", "") + rec("request", b"GET / HTTP/1.1\r\n\r\n", "http://e.org/") + rec("response", http, "http://e.org/")
    (tmp_path / "x.warc.gz").write_bytes(gzip.compress(warc))
    (d,) = _docs(tmp_path / "x.warc.gz")
    assert "Black Sea" in d.text and d.metadata["url"] == "http://e.org/"
