"""Readers: every input format becomes a stream of `Document`s (survey §4.1.1, data sources).

Implements, all streaming:
- jsonl (plain / .gz / .zst) and JSON arrays, one record per document (`text` field, other fields kept);
- plain text files and folders (one document per file, or split on a separator such as `<|endoftext|>`);
- source-code trees (files chosen by extension, `metadata.lang` = the extension);
- parquet (pyarrow, row groups streamed);
- HTML files and WARC archives (main-text extraction with trafilatura; WARC records parsed here,
  .warc and .warc.gz);
- Hugging Face `datasets`: a `save_to_disk` folder (`load_from_disk`) or `hf:NAME[:SPLIT]` through the
  real `load_dataset`.
Malformed records (bad JSON, invalid UTF-8, empty, oversized, no text field) come out as `Rejected`
with a reason; they never stop a run.
"""
from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Callable, Iterator

from .document import Document, Rejected

JSONL_EXT = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".ndjson")
TEXT_EXT = (".txt", ".md", ".rst", ".txt.gz")
HTML_EXT = (".html", ".htm")
WARC_EXT = (".warc", ".warc.gz")
CODE_EXT = (".py", ".c", ".h", ".cpp", ".hpp", ".cc", ".rs", ".go", ".java", ".js", ".ts", ".rb",
            ".sh", ".jl", ".scala", ".kt", ".swift", ".cs", ".php", ".lua", ".sql")
MAX_DOC_BYTES = 5_000_000  # larger records are "oversized": almost always dumps, not documents

Item = Document | Rejected | None


def open_bytes(path: str | Path):
    """Open plain, .gz or .zst files as a binary stream."""
    path = str(path)
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True), 1 << 20)
    return open(path, "rb")


def detect_format(path: str | Path, code: bool = False) -> str | None:
    p = str(path)
    if p.startswith("hf:"):
        return "hf"
    path = Path(p)
    if path.is_dir():
        return "hf_disk" if (path / "state.json").exists() or (path / "dataset_dict.json").exists() else "dir"
    name = path.name.lower()
    for fmt, exts in (("jsonl", JSONL_EXT), ("warc", WARC_EXT), ("html", HTML_EXT), ("text", TEXT_EXT)):
        if name.endswith(exts):
            return fmt
    if name.endswith(".json"):
        return "json"
    if name.endswith(".parquet"):
        return "parquet"
    if code and name.endswith(CODE_EXT):
        return "code"
    return None


def expand_inputs(inputs: list[str], code: bool = False) -> list[tuple[str, str]]:
    """(path, format) for every input file, folders expanded recursively in sorted order."""
    out: list[tuple[str, str]] = []
    for inp in inputs:
        fmt = detect_format(inp, code)
        if fmt == "dir":
            files = sorted(p for p in Path(inp).rglob("*") if p.is_file() and not p.name.startswith("."))
            out += [(str(p), f) for p in files if (f := detect_format(p, code))]
        elif fmt is None:
            if not Path(inp).exists():
                raise FileNotFoundError(f"input {inp} does not exist")
            raise ValueError(f"input {inp}: unknown format; use .jsonl[.gz|.zst], .json, .txt, .parquet, "
                             f".html, .warc[.gz], a folder, a datasets folder or hf:NAME (code files need --code)")
        else:
            out.append((inp, fmt))
    return out


def _check_text(text, where: str, raw: str, max_bytes: int) -> Rejected | None:
    if not isinstance(text, str):
        return Rejected("no_text", where, raw, "record has no string 'text' field")
    if not text.strip():
        return Rejected("empty", where, raw)
    if len(text) > max_bytes // 4 and len(text.encode("utf-8")) > max_bytes:
        return Rejected("oversized", where, raw[:200], f"{len(text.encode())} bytes > {max_bytes}")
    return None


def read_jsonl(path: str, skip: Callable[[int], bool] | None = None, max_bytes: int = MAX_DOC_BYTES) -> Iterator[Item]:
    stem = Path(path).name
    with open_bytes(path) as f:
        for i, line in enumerate(f):
            if skip is not None and skip(i):
                yield None
                continue
            where = f"{path}:{i + 1}"
            if len(line) > max_bytes:
                yield Rejected("oversized", where, line[:200].decode("utf-8", "replace"), f"{len(line)} bytes > {max_bytes}")
                continue
            try:
                s = line.decode("utf-8")
            except UnicodeDecodeError as e:
                yield Rejected("invalid_utf8", where, line[:2000].decode("utf-8", "replace"), str(e))
                continue
            if not s.strip():
                yield Rejected("empty", where, s)
                continue
            try:
                rec = json.loads(s)
            except ValueError as e:
                yield Rejected("bad_json", where, s, str(e))
                continue
            if not isinstance(rec, dict):
                yield Rejected("bad_json", where, s, "record is not a JSON object")
                continue
            yield _check_text(rec.get("text"), where, s, max_bytes) or Document.from_record(rec, stem, f"{stem}:{i}")


def read_json_array(path: str, skip=None, max_bytes: int = MAX_DOC_BYTES) -> Iterator[Item]:
    """A JSON array of objects (e.g. Alpaca): `text` if present, else the string fields joined."""
    stem = Path(path).name
    with open_bytes(path) as f:
        try:
            data = json.loads(f.read().decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            yield Rejected("bad_json", path, "", f"whole file unreadable: {e}")
            return
    for i, rec in enumerate(data if isinstance(data, list) else [data]):
        if skip is not None and skip(i):
            yield None
            continue
        if isinstance(rec, dict) and "text" not in rec:
            rec = {"text": "\n\n".join(v for v in rec.values() if isinstance(v, str) and v.strip()), **rec}
        if not isinstance(rec, dict):
            yield Rejected("bad_json", f"{path}[{i}]", json.dumps(rec)[:2000], "item is not an object")
            continue
        yield _check_text(rec["text"], f"{path}[{i}]", "", max_bytes) or Document.from_record(rec, stem, f"{stem}:{i}")


def _decode(data: bytes, where: str) -> str | Rejected:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        return Rejected("invalid_utf8", where, data[:2000].decode("utf-8", "replace"), str(e))


def read_text(path: str, skip=None, max_bytes: int = MAX_DOC_BYTES, separator: str | None = None,
              fmt: str = "text") -> Iterator[Item]:
    """One document per file, or one per `separator`-delimited piece."""
    with open_bytes(path) as f:
        text = _decode(f.read(), path)
    if isinstance(text, Rejected):
        yield text
        return
    pieces = text.split(separator) if separator else [text]
    meta = {"lang": Path(path).suffix.lstrip(".")} if fmt == "code" else {}
    for i, piece in enumerate(pieces):
        if skip is not None and skip(i):
            yield None
            continue
        piece = piece.strip("\n") if separator else piece
        where = f"{path}#{i}" if separator else path
        bad = _check_text(piece, where, piece[:200], max_bytes)
        yield bad or Document(id=f"{path}#{i}" if separator else path, text=piece, source=Path(path).name, metadata=dict(meta))


def html_to_text(html: str) -> str:
    """Main-text extraction with trafilatura (FineWeb uses it with favour_precision)."""
    import trafilatura

    return trafilatura.extract(html, favor_precision=True, include_comments=False) or ""


def read_html(path: str, skip=None, max_bytes: int = MAX_DOC_BYTES) -> Iterator[Item]:
    if skip is not None and skip(0):
        yield None
        return
    with open_bytes(path) as f:
        html = _decode(f.read(), path)
    if isinstance(html, Rejected):
        yield html
        return
    text = html_to_text(html)
    yield _check_text(text, path, "", max_bytes) or Document(id=path, text=text, source=Path(path).name)


def iter_warc_records(stream) -> Iterator[tuple[dict, bytes]]:
    """WARC/1.x records: (headers, block). Header names are lower-cased."""
    while True:
        line = stream.readline()
        if not line:
            return
        if not line.strip():
            continue
        if not line.startswith(b"WARC/"):
            raise ValueError(f"not a WARC record header: {line[:60]!r}")
        headers = {}
        while (h := stream.readline()).strip():
            k, _, v = h.decode("utf-8", "replace").partition(":")
            headers[k.strip().lower()] = v.strip()
        yield headers, stream.read(int(headers.get("content-length", 0)))


def read_warc(path: str, skip=None, max_bytes: int = MAX_DOC_BYTES) -> Iterator[Item]:
    """HTML responses of a WARC file -> main text; `url` and `date` kept in metadata."""
    with open_bytes(path) as stream:
        i = 0
        for headers, block in iter_warc_records(stream):
            if headers.get("warc-type") != "response":
                continue
            idx, i = i, i + 1
            if skip is not None and skip(idx):
                yield None
                continue
            http_head, _, body = block.partition(b"\r\n\r\n")
            if b"html" not in http_head.lower():
                continue
            url = headers.get("warc-target-uri", "")
            html = body.decode("utf-8", "replace")
            text = html_to_text(html)
            where = f"{path}:{url}"
            yield _check_text(text, where, "", max_bytes) or Document(
                id=headers.get("warc-record-id", where).strip("<>"), text=text, source=Path(path).name,
                metadata={"url": url, "date": headers.get("warc-date", "")})


def read_parquet(path: str, skip=None, max_bytes: int = MAX_DOC_BYTES, text_field: str = "text") -> Iterator[Item]:
    import pyarrow.parquet as pq

    stem, i = Path(path).name, 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            idx, i = i, i + 1
            if skip is not None and skip(idx):
                yield None
                continue
            rec = dict(rec)
            rec["text"] = rec.pop(text_field, None)
            yield _check_text(rec["text"], f"{path}#{idx}", "", max_bytes) or Document.from_record(rec, stem, f"{stem}:{idx}")


def read_hf(spec: str, skip=None, max_bytes: int = MAX_DOC_BYTES, fmt: str = "hf") -> Iterator[Item]:
    """`load_from_disk(folder)` or `hf:NAME[:SPLIT]` via the real `datasets.load_dataset`."""
    import datasets

    if fmt == "hf_disk":
        ds = datasets.load_from_disk(spec)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[next(iter(ds))]
        name = Path(spec).name
    else:
        name, _, split = spec[3:].partition(":")
        ds = datasets.load_dataset(name, split=split or "train", streaming=True)
    for i, rec in enumerate(ds):
        if skip is not None and skip(i):
            yield None
            continue
        yield _check_text(rec.get("text"), f"{spec}#{i}", "", max_bytes) or Document.from_record(dict(rec), name, f"{name}:{i}")


def read_any(path: str, fmt: str, skip=None, max_bytes: int = MAX_DOC_BYTES, separator: str | None = None) -> Iterator[Item]:
    """Dispatch on format; `skip(i)` lets a worker pass over records another worker owns cheaply."""
    if fmt == "jsonl":
        return read_jsonl(path, skip, max_bytes)
    if fmt == "json":
        return read_json_array(path, skip, max_bytes)
    if fmt in ("text", "code"):
        return read_text(path, skip, max_bytes, separator if fmt == "text" else None, fmt)
    if fmt == "html":
        return read_html(path, skip, max_bytes)
    if fmt == "warc":
        return read_warc(path, skip, max_bytes)
    if fmt == "parquet":
        return read_parquet(path, skip, max_bytes)
    if fmt in ("hf", "hf_disk"):
        return read_hf(path, skip, max_bytes, fmt)
    raise ValueError(f"{path}: unknown format {fmt!r}")
