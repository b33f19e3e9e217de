"""`llmkit data tokenize` (llmkit.data.tokenize): the token stream equals encode(doc) + EOS per document, the loader
reads it back, workers do not change the output, and a run killed mid-way resumes to identical files."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from llmkit.artifacts import verify_manifest
from llmkit.data.shards import BatchLoader, TokenDataset, dataset_from_texts, dtype_for_vocab
from llmkit.data.tokenize import main as tokenize_main
from llmkit.data.tokenize import tokenize_to_dir, write_shard
from llmkit.tokenizer import Tokenizer
from llmkit.tokenizer.train import train_tokenizer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stories(shared_data):
    path = shared_data / "tinystories" / "tinystories_val.txt"
    docs = [d.strip("\n") for d in path.read_text().split("<|endoftext|>")]
    return path, [d for d in docs if d.strip()]


@pytest.fixture(scope="module")
def tok_dir(stories, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(stories[1][:300], out, 600, "bpe")
    return out


def _expected(tok_dir, docs):
    tok = Tokenizer.load(tok_dir)
    ids = [tok.encode(d) + [tok.eos_token_id] for d in docs]
    return np.concatenate([np.asarray(i) for i in ids]), np.cumsum([0] + [len(i) for i in ids[:-1]]), tok


def test_tokenize_then_loader_reproduces_the_stream(stories, tok_dir, tmp_path):
    path, docs = stories
    ds = tokenize_to_dir([path], tok_dir, tmp_path / "t", separator="<|endoftext|>", shard_bytes=150_000)
    want, starts, tok = _expected(tok_dir, docs)
    assert len(ds.arrays) > 3 and ds.meta["dtype"] == "uint16" and ds.arrays[0].dtype == np.uint16
    assert np.array_equal(ds.tokens(0, len(ds)), want)
    assert np.array_equal(ds.doc_starts, starts) and ds.n_docs == len(docs) == ds.meta["n_docs"]
    assert ds.eos_id == tok.eos_token_id and (want == tok.eos_token_id).sum() == len(docs)  # EOS between documents
    assert tok.decode(ds.tokens(int(starts[5]), int(starts[6] - starts[5])).tolist()) == docs[5]
    # the unshuffled loader walks the same stream
    lo = BatchLoader(ds, batch_size=2, block_size=64, shuffle=False)
    b = next(lo)
    assert torch.equal(b["input_ids"].reshape(-1), torch.from_numpy(want[:128].astype(np.int64)))
    assert torch.equal(b["labels"].reshape(-1), torch.from_numpy(want[1:129].astype(np.int64)))
    # the in-memory helper builds the same dataset
    mem = dataset_from_texts(docs, tok)
    assert np.array_equal(mem.tokens(0, len(mem)), want) and np.array_equal(mem.doc_starts, starts)
    assert verify_manifest(tmp_path / "t") == []
    assert Tokenizer.load(tmp_path / "t" / "tokenizer").encode(docs[0]) == tok.encode(docs[0])


def test_workers_give_identical_output(stories, tok_dir, tmp_path):
    path, docs = stories
    a = tokenize_to_dir(None, tok_dir, tmp_path / "a", texts=docs[:400], shard_bytes=60_000)
    b = tokenize_to_dir(None, tok_dir, tmp_path / "b", texts=docs[:400], shard_bytes=60_000, workers=2)
    assert len(a.arrays) == len(b.arrays) > 2
    for f in sorted((tmp_path / "a").glob("shard_*")):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name


def _cmd(path, tok_dir, out):
    return [sys.executable, "-c", "import sys; from llmkit.data.tokenize import main; sys.exit(main(sys.argv[1:]))",
            str(path), "--tokenizer", str(tok_dir), "--out", str(out), "--separator", "<|endoftext|>",
            "--shard-mb", "0.01"]


def test_kill_and_resume_gives_identical_output(stories, tok_dir, tmp_path):
    path, docs = stories
    ref = tmp_path / "ref"
    assert tokenize_main(_cmd(path, tok_dir, ref)[3:]) == 0
    n_shards = len(list(ref.glob("*.done")))
    assert n_shards > 40
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(_cmd(path, tok_dir, out), env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.glob("*.done"))) < 5 and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(out.glob("*.done")))
    assert 5 <= done < n_shards, "the kill must land mid-way"
    assert not (out / "tokens.json").exists()
    # other ways a run goes wrong: a marker whose file is truncated, a shard without its marker, a damaged file
    (out / "shard_00001.bin").write_bytes((out / "shard_00001.bin").read_bytes()[:-6])
    (out / "shard_00002.done").unlink()
    damaged = bytearray((out / "shard_00003.bin").read_bytes())  # same size, one flipped bit
    damaged[7] ^= 1
    (out / "shard_00003.bin").write_bytes(bytes(damaged))
    assert tokenize_main(_cmd(path, tok_dir, out)[3:]) == 0
    names = sorted(p.name for p in ref.glob("shard_*"))
    assert names == sorted(p.name for p in out.glob("shard_*"))
    for name in names:
        assert (ref / name).read_bytes() == (out / name).read_bytes(), name
    assert json.loads((ref / "tokens.json").read_text()) == json.loads((out / "tokens.json").read_text())


def test_resume_refuses_changed_settings(stories, tok_dir, tmp_path):
    path, docs = stories
    tokenize_to_dir(None, tok_dir, tmp_path, texts=docs[:20])
    with pytest.raises(ValueError, match="shard_bytes"):
        tokenize_to_dir(None, tok_dir, tmp_path, texts=docs[:20], shard_bytes=1000)
    other = train_tokenizer(docs[:100], tmp_path.parent / "other_tok", 400, "bpe")
    before = (tmp_path / "tokenizer" / "tokenizer.json").read_bytes()
    with pytest.raises(ValueError, match="tokenizer_sha256"):
        tokenize_to_dir(None, other, tmp_path, texts=docs[:20])
    assert (tmp_path / "tokenizer" / "tokenizer.json").read_bytes() == before


def test_uint32_for_large_vocabularies(tmp_path, tok_dir):
    assert dtype_for_vocab(65536) == np.uint16 and dtype_for_vocab(65537) == np.uint32
    m = write_shard(0, ["Once upon a time", "the end"], str(tmp_path), str(tok_dir / "tokenizer.json"), 70_000,
                    "uint32")
    (tmp_path / "tokens.json").write_text(json.dumps({"dtype": "uint32", "eos_id": 70_000, "shards": [m]}))
    ds = TokenDataset(tmp_path)
    assert ds.arrays[0].dtype == np.uint32 and (tmp_path / "shard_00000.bin").stat().st_size == 4 * len(ds)
    assert ds.tokens(0, len(ds))[-1] == 70_000 and ds.n_docs == 2


def test_no_documents_is_a_clear_error(tok_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no documents"):
        tokenize_to_dir([empty], tok_dir, tmp_path / "out")


def test_cleaning_output_folder_of_jsonl_zst(stories, tok_dir, tmp_path):
    import zstandard

    _, docs = stories
    folder = tmp_path / "clean"
    folder.mkdir()
    parts = [docs[:30], docs[30:70]]
    for k, part in enumerate(parts):
        lines = "".join(json.dumps({"id": f"{k}-{i}", "text": t, "source": "ts", "metadata": {"lang": "en"}}) + "\n"
                        for i, t in enumerate(part))
        (folder / f"part-{k:05d}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    ds = tokenize_to_dir([folder], tok_dir, tmp_path / "t")
    want, starts, tok = _expected(tok_dir, docs[:70])
    assert np.array_equal(ds.tokens(0, len(ds)), want) and np.array_equal(ds.doc_starts, starts)
    # the in-memory helper accepts a raw tokenizers.Tokenizer too
    raw = dataset_from_texts(docs[:70], tok.tok, eos_id=tok.eos_token_id)
    assert np.array_equal(raw.tokens(0, len(raw)), want)
