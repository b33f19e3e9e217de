"""Bench: data-cleaning throughput of llmkit vs datatrove on >= 50 MB of real text (survey §4.1).

Same run, same input file, same machine, one worker each, end to end (read jsonl -> blocks -> write):
  (a) Gopher repetition + Gopher quality + C4 quality filtering;
  (b) MinHash-LSH near-duplicate removal, 5-gram shingles, 14 bands x 8 rows, seed 1 (datatrove's
      4 stages: signatures, buckets, clusters, filter) -- with the recall of planted near-copies and
      the number of removed documents reported for both, so the speed is compared at equal recall.
The corpus is real text from ../shared/data (TinyStories, WikiText-2, Tiny Shakespeare, Alpaca) cut into
documents and replicated with word-level variation (30% of words resampled per replica, so replicas are
not near-duplicates) up to --mb megabytes, plus 1% planted near-copies (one word changed).
The peer runs on the first --peer-mb of the same corpus (default 5 MB: datatrove's spaCy-tokenised
filters run at ~0.05 MB/s on this shared 2-core machine, so 50 MB would take ~15 minutes); llmkit runs on
that same prefix (the ratio is measured there, same input) and on the full --mb corpus.
Usage: .venv/bin/python bench/data.py [--mb 50] [--peer-mb 5] [--only filters|minhash]
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
    return f"  {name:<16} {sec:7.1f} s  {info['docs'] / sec:9.0f} docs/s  {info['mb'] / sec:6.2f} MB/s"


def prefix(corpus: Path, out: Path, mb: float) -> dict:
    size, n, planted, lines = 0, 0, 0, []
    for line in open(corpus):
        if size >= mb * 1e6:
            break
        rec = json.loads(line)
        size += len(rec["text"].encode())
        planted += rec["id"].startswith("near-")
        lines.append(line)
    out.write_text("".join(lines))
    return {"docs": len(lines), "mb": size / 1e6, "planted": planted}


def bench_filters(full, finfo, peer, pinfo, tmp) -> None:
    stages = [{"preset": "gopher"}, {"preset": "c4"}]
    ours_full, st_full, _ = llmkit_run(full, tmp / "lf_full", stages)
    ours, stats, _ = llmkit_run(peer, tmp / "lf", stages)
    theirs, dt_kept = datatrove_filters(peer, tmp / "df")
    print(f"(a) Gopher repetition + quality + C4 filtering, kept on the {pinfo['mb']:.0f} MB prefix: "
          f"llmkit {stats['c4_quality']['out']}, datatrove {dt_kept} of {pinfo['docs']}")
    print(line(f"llmkit {finfo['mb']:.0f}MB", ours_full, finfo))
    print(line(f"llmkit {pinfo['mb']:.0f}MB", ours, pinfo))
    print(line(f"datatrove {pinfo['mb']:.0f}MB", theirs, pinfo))
    print(f"  speed-up on the same input x{theirs / ours:.2f}")


def bench_minhash(full, finfo, peer, pinfo, tmp) -> None:
    stages = [{"type": "minhash_dedup", "ngram": 5, "bands": 14, "rows": 8}]
    ours_full, _, out_full = llmkit_run(full, tmp / "lm_full", stages)
    ours, _, out = llmkit_run(peer, tmp / "lm", stages)
    theirs, dt_kept = datatrove_minhash(peer, tmp / "dm")
    ids = [json.loads(x)["id"] for x in open(peer)]
    near = {i for i in ids if i.startswith("near-")}
    lk = kept_ids(out)
    rec = lambda kept: len(near - kept) / max(len(near), 1)  # noqa: E731
    full_ids = [json.loads(x)["id"] for x in open(full)]
    full_near = {i for i in full_ids if i.startswith("near-")}
    full_rec = len(full_near - kept_ids(out_full)) / max(len(full_near), 1)
    print(f"(b) MinHash 5-gram 14x8 on the {pinfo['mb']:.0f} MB prefix: removed llmkit {len(ids) - len(lk)}, "
          f"datatrove {len(ids) - len(dt_kept)}; recall of planted near-copies llmkit {rec(lk):.3f}, "
          f"datatrove {rec(dt_kept):.3f}; identical kept sets: {lk == dt_kept}. Full corpus recall llmkit {full_rec:.3f}")
    print(line(f"llmkit {finfo['mb']:.0f}MB", ours_full, finfo))
    print(line(f"llmkit {pinfo['mb']:.0f}MB", ours, pinfo))
    print(line(f"datatrove {pinfo['mb']:.0f}MB", theirs, pinfo))
    print(f"  speed-up on the same input x{theirs / ours:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=50)
    ap.add_argument("--peer-mb", type=float, default=5)
    ap.add_argument("--only", choices=("filters", "minhash"))
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="llmkit-bench-data-"))
    try:
        full, peer = tmp / "corpus.jsonl", tmp / "peer" / "corpus.jsonl"
        peer.parent.mkdir()
        finfo = build_corpus(full, a.mb)
        pinfo = prefix(full, peer, a.peer_mb)
        print(f"corpus: {finfo['docs']} docs, {finfo['mb']:.1f} MB of text, {finfo['planted']} planted near-copies; "
              f"peer prefix {pinfo['docs']} docs, {pinfo['mb']:.1f} MB")
        if a.only in (None, "filters"):
            bench_filters(full, finfo, peer, pinfo, tmp)
        if a.only in (None, "minhash"):
            bench_minhash(full, finfo, peer, pinfo, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
