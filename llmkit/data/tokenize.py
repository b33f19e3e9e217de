"""`llmkit data tokenize`: documents -> packed token shards (survey §4.1.2 tokenization, ready to pre-train).

Implements:
- a deterministic split of the document stream into shards of about `shard_bytes` of text (the boundaries
  depend only on the inputs and settings, never on the number of workers);
- per shard: `shard_NNNNN.bin` (uint16 when the vocabulary has <= 65536 ids, else uint32; EOS after every
  document), `shard_NNNNN.idx` (int64 document start offsets, n_docs + 1 entries) and last a
  `shard_NNNNN.done` marker holding the hashes and counts; a shard counts as done only when its marker
  matches its files (sizes and sha256) and its input text, so a killed run resumes where it stopped and gives
  identical output, and a shard damaged after its marker is redone;
- N worker processes (each single-threaded), or in-process multi-threaded encoding with workers=1;
- `tokens.json` (dtype, eos id, vocabulary size, shards), a copy of the tokenizer, and `manifest.json`.
Read the result with `llmkit.data.shards.TokenDataset(out_dir)`.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..artifacts import atomic_write_bytes, atomic_write_json, file_sha256, write_manifest

# shards.py (the loader) imports torch; it is imported lazily so spawned workers start in a fraction of a second

SHARD_BYTES = 64 << 20  # 64 MB of text per shard: ~16M tokens, a 32 MB uint16 file; big enough to amortise
SETTINGS_JSON = "tokenize_settings.json"


def _shard_name(k: int) -> str:
    return f"shard_{k:05d}"


def _text_hash(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(len(t).to_bytes(8, "little"))
        h.update(t.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def iter_shards(docs: Iterable[str], shard_bytes: int) -> Iterator[list[str]]:
    """Group documents into shards of at least `shard_bytes` UTF-8 bytes (the last one may be smaller)."""
    cur, size = [], 0
    for d in docs:
        cur.append(d)
        size += len(d.encode("utf-8"))
        if size >= shard_bytes:
            yield cur
            cur, size = [], 0
    if cur:
        yield cur


# -- one shard ------------------------------------------------------------------------------------------------
_WORKER_TOK = {}


def _load_hf(tokenizer_json: str):
    if tokenizer_json not in _WORKER_TOK:
        from tokenizers import Tokenizer as HFTokenizer

        _WORKER_TOK[tokenizer_json] = HFTokenizer.from_file(tokenizer_json)
    return _WORKER_TOK[tokenizer_json]


def _worker_init():
    # each worker process encodes on one thread; the processes are the parallelism
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def encode_shard(texts: list[str], tokenizer_json: str, eos_id: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, doc index): every document's ids followed by EOS, and the n_docs + 1 start offsets."""
    hf = _load_hf(tokenizer_json)
    # encode_batch_fast (tokenizers >= 0.21) skips character offsets, which packing never uses
    enc = getattr(hf, "encode_batch_fast", hf.encode_batch)(texts, add_special_tokens=False)
    docs = [e.ids for e in enc]  # .ids builds a new list on every access: take it once
    for d in docs:
        d.append(eos_id)
    lens = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
    idx = np.concatenate([[0], np.cumsum(lens)]).astype("<i8")
    out = np.fromiter(itertools.chain.from_iterable(docs), dtype=dtype, count=int(idx[-1]))
    return out, idx


def write_shard(k: int, texts: list[str], out_dir: str, tokenizer_json: str, eos_id: int, dtype: str,
                text_sha: str | None = None) -> dict:
    """Encode and write shard k; the .done marker goes last, after both files are complete on disk."""
    tokens, idx = encode_shard(texts, tokenizer_json, eos_id, dtype)
    d, name = Path(out_dir), _shard_name(k)
    b, i = tokens.astype(np.dtype(dtype).newbyteorder("<")).tobytes(), idx.tobytes()
    atomic_write_bytes(d / f"{name}.bin", b)
    atomic_write_bytes(d / f"{name}.idx", i)
    marker = {"file": f"{name}.bin", "n_tokens": int(len(tokens)), "n_docs": len(texts),
              "text_bytes": sum(len(t.encode("utf-8")) for t in texts), "text_sha256": text_sha or _text_hash(texts),
              "bin_sha256": hashlib.sha256(b).hexdigest(), "idx_sha256": hashlib.sha256(i).hexdigest()}
    atomic_write_json(d / f"{name}.done", marker)
    return marker


def _done_marker(d: Path, k: int, text_sha: str, itemsize: int) -> dict | None:
    """The shard's marker if it is complete and was made from this same text; else None (redo it)."""
    name = _shard_name(k)
    try:
        m = json.loads((d / f"{name}.done").read_text())
        ok = (m["text_sha256"] == text_sha and (d / f"{name}.bin").stat().st_size == m["n_tokens"] * itemsize
              and (d / f"{name}.idx").stat().st_size == (m["n_docs"] + 1) * 8
              # hashing a shard costs ~1% of tokenizing it, and catches files damaged after their marker
              and file_sha256(d / f"{name}.bin") == m["bin_sha256"]
              and file_sha256(d / f"{name}.idx") == m["idx_sha256"])
    except (OSError, ValueError, KeyError):
        return None
    return m if ok else None


# -- the run ------------------------------------------------------------------------------------------------
def _load_tokenizer(tokenizer):
    """(Tokenizer, eos id, vocab size) from a directory, a tokenizer.json, or an llmkit Tokenizer."""
    from ..tokenizer import Tokenizer

    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.load(tokenizer)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer}: no eos_token in tokenizer_config.json; documents need an EOS "
                         f"between them (train with `llmkit tokenizer train`, or set eos_token)")
    return tok, tok.eos_token_id, tok.vocab_size


def tokenize_to_dir(inputs: Iterable[str | Path] | None, tokenizer, out_dir: str | Path, *,
                    texts: Iterable[str] | None = None, workers: int = 1, shard_bytes: int = SHARD_BYTES,
                    separator: str | None = None, command: list[str] | None = None):
    """Tokenize files (`inputs`, read with llmkit.data.readers) and/or in-memory `texts` into `out_dir`.

    `tokenizer`: a tokenizer directory or an llmkit `Tokenizer`. Re-running on the same out_dir resumes:
    finished shards are kept, unfinished ones are redone. Returns the `TokenDataset` of the output.
    """
    from ..tokenizer.train import iter_documents
    from .shards import TOKENS_JSON, TokenDataset, dtype_for_vocab

    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    tok, eos_id, vocab = _load_tokenizer(tokenizer)
    dtype = dtype_for_vocab(vocab)
    inputs = [str(p) for p in (inputs or [])]
    settings = {"inputs": inputs, "texts": None if texts is None else "in-memory", "shard_bytes": shard_bytes,
                "separator": separator, "eos_id": eos_id, "dtype": dtype.name, "vocab_size": vocab,
                "tokenizer_sha256": hashlib.sha256(tok.tok.to_str().encode()).hexdigest()}
    _check_settings(d, settings)  # before anything is written: a refused resume leaves the directory as it was
    tok.save(d / "tokenizer")  # the tokens dir carries its tokenizer: decoding never needs the source path
    tok_json = str(d / "tokenizer" / "tokenizer.json")
    docs = iter_documents(inputs, separator) if inputs else iter(())
    if texts is not None:
        docs = _chain(docs, texts)
    markers = _run(d, iter_shards(docs, shard_bytes), tok_json, eos_id, dtype, workers)
    if not markers:
        raise ValueError(f"no documents to tokenize in {inputs or 'texts'}: check the paths, the --separator and "
                         f"that jsonl records have a 'text' field")
    for stale in sorted(d.glob("shard_*.done"))[len(markers):]:  # leftovers of an earlier, longer run
        for ext in (".done", ".bin", ".idx"):
            stale.with_suffix(ext).unlink(missing_ok=True)
    meta = {"dtype": dtype.name, "eos_id": eos_id, "vocab_size": vocab, "n_tokens": sum(m["n_tokens"] for m in markers),
            "n_docs": sum(m["n_docs"] for m in markers), "tokenizer": "tokenizer",
            "shards": [{k: m[k] for k in ("file", "n_tokens", "n_docs")} for m in markers]}
    atomic_write_json(d / TOKENS_JSON, meta)
    parents = [Path(p) for p in inputs] + ([Path(tokenizer)] if isinstance(tokenizer, (str, Path)) else [])
    write_manifest(d, "tokens", parents=parents, config=settings, command=command)
    return TokenDataset(d)


def _chain(a, b):
    yield from a
    yield from b


def _check_settings(d: Path, settings: dict) -> None:
    p = d / SETTINGS_JSON
    if p.exists():
        old = json.loads(p.read_text())
        diff = [k for k in settings if old.get(k) != settings[k]]
        if diff:
            raise ValueError(f"{d}: was tokenized with other settings ({', '.join(diff)} differ); resume with the "
                             f"same inputs and options, or use a new --out directory")
    atomic_write_json(p, settings)


def _run(d: Path, shards: Iterator[list[str]], tok_json: str, eos_id: int, dtype, workers: int) -> list[dict]:
    """Write every shard that is not already done; in order; at most 2 shards per worker held in memory."""
    markers, pending = [], []
    pool = mp.get_context("spawn").Pool(workers, initializer=_worker_init) if workers > 1 else None
    try:
        for k, texts in enumerate(shards):
            sha = _text_hash(texts)
            m = _done_marker(d, k, sha, dtype.itemsize)
            if m is not None:
                markers.append(m)
                continue
            args = (k, texts, str(d), tok_json, eos_id, dtype.name, sha)
            if pool is None:
                markers.append(write_shard(*args))
                continue
            pending.append((len(markers), pool.apply_async(write_shard, args)))
            markers.append(None)
            while len(pending) >= 2 * workers:
                i, r = pending.pop(0)
                markers[i] = r.get()
        for i, r in pending:
            markers[i] = r.get()
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return markers


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="llmkit data tokenize",
                                description="documents -> packed uint16/uint32 token shards + document index")
    p.add_argument("inputs", nargs="+", help="jsonl(.gz/.zst) with a text field (the cleaning output), text files")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (tokenizer.json + tokenizer_config.json)")
    p.add_argument("--out", required=True, help="output token directory; re-run the same command to resume")
    p.add_argument("--workers", type=int, default=1, help="processes (1 = in-process, multi-threaded encoding)")
    p.add_argument("--shard-mb", type=float, default=SHARD_BYTES / 2**20, help="text per shard in MB")
    p.add_argument("--separator", help="split text files into documents on this string, e.g. '<|endoftext|>'")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    ds = tokenize_to_dir(a.inputs, a.tokenizer, a.out, workers=a.workers, shard_bytes=int(a.shard_mb * 2**20),
                         separator=a.separator, command=["llmkit", "data", "tokenize", *argv])
    print(json.dumps({"out": a.out, "n_tokens": len(ds), "n_docs": ds.n_docs, "shards": len(ds.arrays),
                      "dtype": ds.meta["dtype"], "seconds": round(time.perf_counter() - t0, 2)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
