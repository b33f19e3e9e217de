"""Bench: data-cleaning throughput of llmkit vs datatrove on >= 50 MB of real text (survey §4.1).

Same run, same input file, same machine, one worker each, end to end (read jsonl -> blocks -> write):
  (a) Gopher repetition + Gopher quality + C4 quality filtering;
  (b) MinHash-LSH near-duplicate removal, 5-gram shingles, 14 bands x 8 rows, seed 1 (datatrove's
      4 stages: signatures, buckets, clusters, filter) -- with the recall of planted near-copies and
      the number of removed documents reported for both, so the speed is compared at equal recall.
The corpus is real text from ../shared/data (TinyStories, WikiText-2, Tiny Shakespeare, Alpaca) cut into
documents and replicated with word-level variation (30% of words resampled per replica, so replicas are
not near-duplicates) up to --mb megabytes, plus 1% planted near-copies (one word changed).
Usage: .venv/bin/python bench/data.py [--mb 50] [--only filters|minhash]
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("LLMKIT_SHARED_DATA", REPO.parent / "shared" / "data"))


def base_documents() -> list[str]:
    docs = []
    ts = (SHARED / "tinystories" / "tinystories_val.txt").read_text()
    docs += [s.strip() for s in ts.split("<|endoftext|>") if s.strip()]
    for p in sorted((SHARED / "tinystories" / "lowercased_train_subset").glob("*.gz")):
        words = gzip.decompress(p.read_bytes()).decode("utf-8", "replace").split(" ")
        docs += [" ".join(words[i: i + 300]) for i in range(0, len(words), 300)]
    wiki = (SHARED / "wikitext-2" / "raw" / "wiki.test.raw").read_text().replace("\r\n", "\n")
    docs += [a.strip() for a in wiki.split("\n = ") if len(a.split()) > 50]
    sh = (SHARED / "tinyshakespeare" / "input.txt").read_text().split("\n\n")
    docs += ["\n\n".join(sh[i: i + 12]) for i in range(0, len(sh), 12)]
    alp = json.loads((SHARED / "alpaca" / "alpaca_data_1k.json").read_text())
    docs += ["\n\n".join(v for v in (r["instruction"], r["input"], r["output"]) if v) for r in alp]
    return docs


def build_corpus(path: Path, mb: float, seed: int = 0) -> dict:
    rng = random.Random(seed)
    base = base_documents()
    vocab = " ".join(base[:3000]).split()
    lines, size, planted, k = [], 0, 0, 0
    while size < mb * 1e6:
        for i, text in enumerate(base):
            if k:  # a varied replica: 30% of the words resampled
                words = text.split(" ")
                text = " ".join(rng.choice(vocab) if rng.random() < 0.3 else w for w in words)
            lines.append(json.dumps({"id": f"r{k}-{i}", "text": text}))
            size += len(text.encode())
            if rng.random() < 0.01:  # planted near-copy: one word changed
                words = text.split(" ")
                words[rng.randrange(len(words))] = "qqqq"
                lines.append(json.dumps({"id": f"near-r{k}-{i}", "text": " ".join(words)}))
                size += len(text.encode())
                planted += 1
            if size >= mb * 1e6:
                break
        k += 1
    path.write_text("\n".join(lines) + "\n")
    return {"docs": len(lines), "mb": size / 1e6, "planted": planted}


def run_datatrove(pipeline: list, logs: Path, tasks: int = 1) -> float:
    from datatrove.executor import LocalPipelineExecutor

    t = time.perf_counter()
    LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=1, logging_dir=str(logs)).run()
    return time.perf_counter() - t


def datatrove_filters(corpus: Path, work: Path) -> tuple[float, int]:
    from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    sec = run_datatrove([JsonlReader(str(corpus.parent), glob_pattern=corpus.name), GopherRepetitionFilter(),
                         GopherQualityFilter(), C4QualityFilter(), JsonlWriter(str(work / "out"), compression=None)],
                        work / "logs")
    kept = sum(1 for p in (work / "out").glob("*.jsonl") for _ in open(p))
    return sec, kept


def datatrove_minhash(corpus: Path, work: Path) -> tuple[float, set]:
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                   MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    from datatrove.utils.hashing import HashConfig

    # FineWeb's setting (sha1, 64-bit); datatrove's xxhash path breaks with xxhash>=4 (it pins <4)
    cfg = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8, seed=1,
                        hash_config=HashConfig(precision=64, hash_fc="sha1"))
    reader = lambda: JsonlReader(str(corpus.parent), glob_pattern=corpus.name)  # noqa: E731
    sec = run_datatrove([reader(), MinhashDedupSignature(str(work / "sigs"), config=cfg)], work / "l1")
    # the bucket stage needs tasks divisible by num_buckets: 14 tasks, still one worker
    sec += run_datatrove([MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=cfg)], work / "l2", tasks=14)
    sec += run_datatrove([MinhashDedupCluster(str(work / "buckets"), str(work / "remove"), config=cfg)], work / "l3")
    sec += run_datatrove([reader(), MinhashDedupFilter(str(work / "remove")),
                          JsonlWriter(str(work / "out"), compression=None)], work / "l4")
    kept = {json.loads(line)["id"] for p in (work / "out").glob("*.jsonl") for line in open(p)}
    return sec, kept


def llmkit_run(corpus: Path, work: Path, stages: list) -> tuple[float, dict, Path]:
    from llmkit.data.runner import clean

    cfg = {"stages": stages, "docs_per_shard": 5000, "max_doc_bytes": 5_000_000}
    t = time.perf_counter()
    stats = clean([str(corpus)], work / "out", cfg, workers=1)
    return time.perf_counter() - t, stats, work / "out"


def kept_ids(out: Path) -> set:
    import zstandard

    return {json.loads(x)["id"] for p in (out / "data").glob("*.zst") for x in zstandard.decompress(p.read_bytes()).decode().splitlines()}


def line(name, sec, info):
    return f"  {name:<10} {sec:7.1f} s  {info['docs'] / sec:9.0f} docs/s  {info['mb'] / sec:6.2f} MB/s"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=50)
    ap.add_argument("--only", choices=("filters", "minhash"))
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="llmkit-bench-data-"))
    try:
        corpus = tmp / "corpus.jsonl"
        info = build_corpus(corpus, a.mb)
        print(f"corpus: {info['docs']} docs, {info['mb']:.1f} MB of text, {info['planted']} planted near-copies")
        if a.only in (None, "filters"):
            ours, stats, _ = llmkit_run(corpus, tmp / "lf", [{"preset": "gopher"}, {"preset": "c4"}])
            theirs, dt_kept = datatrove_filters(corpus, tmp / "df")
            print(f"(a) Gopher repetition + quality + C4 filtering (kept: llmkit {stats['c4_quality']['out']}, datatrove {dt_kept})")
            print(line("llmkit", ours, info))
            print(line("datatrove", theirs, info))
            print(f"  speed-up x{theirs / ours:.2f}")
        if a.only in (None, "minhash"):
            ours, stats, out = llmkit_run(corpus, tmp / "lm", [{"type": "minhash_dedup", "ngram": 5, "bands": 14, "rows": 8}])
            theirs, dt_kept = datatrove_minhash(corpus, tmp / "dm")
            ids = [json.loads(x)["id"] for x in open(corpus)]
            near = {i for i in ids if i.startswith("near-")}
            lk = kept_ids(out)
            rec = lambda kept: len(near - kept) / max(len(near), 1)  # noqa: E731
            print(f"(b) MinHash 5-gram 14x8: removed llmkit {len(ids) - len(lk)}, datatrove {len(ids) - len(dt_kept)}; "
                  f"recall of planted near-copies llmkit {rec(lk):.3f}, datatrove {rec(dt_kept):.3f}; "
                  f"same kept set: {lk == dt_kept}")
            print(line("llmkit", ours, info))
            print(line("datatrove", theirs, info))
            print(f"  speed-up x{theirs / ours:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
