"""Tokenizer training time and encoding throughput on real text (issue 2, Speed; survey §4.1.2).

Same run, same text (../shared/data: TinyStories train subset + validation + Tiny Shakespeare, ~6 MB):
- training: `llmkit.tokenizer.train.train_tokenizer` (byte-level BPE, GPT-2 pre-tokenisation) vs the peers
  HF `tokenizers` ByteLevelBPETokenizer (what llmkit drives, so overhead shows) and SentencePiece BPE;
- encoding MB/s: `llmkit data tokenize` end to end (read, encode, EOS, pack to uint16, index, fsync'd shards),
  in-process and with 2 worker processes, vs the peers HF `tokenizers` `encode_batch` (ids in memory only) and
  transformers' `PreTrainedTokenizerFast` batch call on the same tokenizer.

    .venv/bin/python bench/tokenizer.py [--vocab-size 8192] [--mb 6]
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("LLMKIT_SHARED_DATA", REPO.parent / "shared" / "data"))


def load_docs(max_mb: float) -> list[str]:
    ts = DATA / "tinystories"
    docs = [d.strip("\n") for d in (ts / "tinystories_val.txt").read_text().split("<|endoftext|>") if d.strip()]
    with gzip.open(ts / "lowercased_train_subset" / "tinystories.txt.gz", "rt") as f:
        docs += [p for p in f.read().split("\n\n") if p.strip()]  # no story separators: paragraphs as documents
    shakespeare = (DATA / "tinyshakespeare" / "input.txt").read_text()
    docs += [p for p in shakespeare.split("\n\n") if p.strip()]
    out, size = [], 0
    for d in docs:
        out.append(d)
        size += len(d.encode())
        if size >= max_mb * 2**20:
            break
    return out


def timed(fn):
    t = time.perf_counter()
    r = fn()
    return r, time.perf_counter() - t


def bench_training(docs, vocab, tmp):
    from tokenizers import ByteLevelBPETokenizer

    from llmkit.tokenizer.train import train_tokenizer

    tok, t_ours = timed(lambda: train_tokenizer(docs, tmp / "ours", vocab, "bpe"))
    hf = ByteLevelBPETokenizer()
    _, t_hf = timed(lambda: hf.train_from_iterator(docs, vocab_size=vocab, min_frequency=2, show_progress=False,
                                                   special_tokens=["<|endoftext|>"]))
    res = {"llmkit_s": t_ours, "hf_tokenizers_s": t_hf, "bytes_per_token": tok.stats["bytes_per_token"]}
    try:
        import sentencepiece as spm

        corpus = tmp / "corpus.txt"
        corpus.write_text("\n".join(d.replace("\n", " ") for d in docs))
        _, t_spm = timed(lambda: spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(tmp / "spm"), vocab_size=vocab, model_type="bpe",
            byte_fallback=True, minloglevel=2, num_threads=os.cpu_count(), max_sentence_length=1 << 20))
        res["sentencepiece_bpe_s"] = t_spm
    except Exception as e:  # SentencePiece is an optional peer
        res["sentencepiece_error"] = str(e)[:200]
    return res


def bench_encoding(docs, tok_dir, tmp):
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import PreTrainedTokenizerFast

    from llmkit.data.tokenize import tokenize_to_dir

    mb = sum(len(d.encode()) for d in docs) / 2**20
    hf = HFTokenizer.from_file(str(tok_dir / "tokenizer.json"))
    _, t_hf = timed(lambda: hf.encode_batch(docs, add_special_tokens=False))
    fast = PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"))
    _, t_tf = timed(lambda: fast(docs, add_special_tokens=False)["input_ids"])
    shard = 4 << 20  # 4 MB shards so 2 workers have work to share on this ~6 MB input
    _, t_ours = timed(lambda: tokenize_to_dir(None, tok_dir, tmp / "tok1", texts=docs, shard_bytes=shard))
    _, t_ours2 = timed(lambda: tokenize_to_dir(None, tok_dir, tmp / "tok2", texts=docs, shard_bytes=shard, workers=2))
    return {"mb": mb, "hf_encode_batch_mbs": mb / t_hf, "transformers_fast_mbs": mb / t_tf,
            "llmkit_tokenize_mbs": mb / t_ours, "llmkit_tokenize_2workers_mbs": mb / t_ours2}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--mb", type=float, default=6.0)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    docs = load_docs(a.mb)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tr = bench_training(docs, a.vocab_size, tmp)
        enc = bench_encoding(docs, tmp / "ours", tmp)
    mb = enc["mb"]
    print(f"text: {mb:.2f} MB, {len(docs)} documents, vocab {a.vocab_size}, {os.cpu_count()} CPU cores")
    print(f"training  llmkit {tr['llmkit_s']:.2f}s ({mb / tr['llmkit_s']:.2f} MB/s) | HF ByteLevelBPETokenizer "
          f"{tr['hf_tokenizers_s']:.2f}s | ratio llmkit/HF time {tr['llmkit_s'] / tr['hf_tokenizers_s']:.2f}"
          + (f" | SentencePiece BPE {tr['sentencepiece_bpe_s']:.2f}s" if "sentencepiece_bpe_s" in tr else ""))
    print(f"held-out bytes/token {tr['bytes_per_token']}")
    print(f"encoding  llmkit tokenize (to shards) {enc['llmkit_tokenize_mbs']:.2f} MB/s, 2 workers "
          f"{enc['llmkit_tokenize_2workers_mbs']:.2f} MB/s | HF encode_batch (in memory) "
          f"{enc['hf_encode_batch_mbs']:.2f} MB/s | transformers fast {enc['transformers_fast_mbs']:.2f} MB/s | "
          f"ratio llmkit/HF {enc['llmkit_tokenize_mbs'] / enc['hf_encode_batch_mbs']:.2f}, "
          f"llmkit/transformers {enc['llmkit_tokenize_mbs'] / enc['transformers_fast_mbs']:.2f}")
    print(json.dumps({"training": tr, "encoding": enc}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
