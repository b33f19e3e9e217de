"""The cleaning runner: streaming, N workers, validated shards, resume after a kill (survey §4.1).

How a run is laid out (DIR = --output):
- pass 0 reads the inputs; every input file is cut into chunks of `docs_per_shard` records, and a
  chunk is the unit of work and of resume (so resume works *inside* a file, which datatrove cannot,
  issue #316). When there are fewer files than workers, workers share a file by chunk stride.
- the pipeline is split at its global (dedup) stages into segments; pass k runs segment k's
  per-document stages and computes the keys of the global stage that ends it; between passes the
  driver makes the global decision (vectorised, in global order), and pass k+1 applies it.
- every shard is written to a temporary file, read back and checked (decompressed bytes hash,
  record count) and only then renamed and given its completion marker in DIR/completions/, whose
  JSON holds the shard's sha256 and stats; on resume a marker counts only if the shard still
  matches its hash (datatrove #157: corrupt files marked done).
- malformed records go to DIR/rejected/ with a reason; with `keep_removed: true` every document a stage
  drops goes to DIR/removed/ with the stage and reason (datatrove's exclusion writer); final shards are
  DIR/data/*.jsonl.zst; then
  stats.json (per stage: in/out/removed by reason), report.html and manifest.json.
The result is byte-identical whatever the number of workers and however often the run was killed.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import shutil
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import zstandard

from ..artifacts import atomic_write_bytes, atomic_write_json, file_sha256, write_manifest
from .document import Document, Rejected
from .pipeline import build_stages, load_config, segments
from .readers import expand_inputs, open_bytes, read_any
from .stage import StageStats

_STAGE_CACHE: dict[str, list] = {}


def _stages(cfg: dict):
    """Stages built once per process (models and indexes load once), fresh stats per shard."""
    key = json.dumps(cfg, sort_keys=True, default=str)
    if key not in _STAGE_CACHE:
        _STAGE_CACHE[key] = build_stages(cfg)
    stages = _STAGE_CACHE[key]
    _reset(stages, cfg)
    return stages


def _reset(stages, cfg: dict) -> None:
    """New stats, and a new exclusion list when `keep_removed` is on (removed docs go to DIR/removed/)."""
    sink = [] if cfg.get("keep_removed") else None
    for st in stages:
        st.stats = StageStats()
        st.removed_sink = sink


def shard_name(file_idx: int, chunk: int) -> str:
    return f"part-{file_idx:05d}-{chunk:05d}"


class Layout:
    def __init__(self, out: str | Path, n_passes: int):
        self.out, self.n_passes = Path(out), n_passes

    def data(self, k: int, shard: str) -> Path:
        base = self.out / "data" if k == self.n_passes - 1 else self.out / "_work" / f"pass{k}"
        return base / f"{shard}.jsonl.zst"

    def keys(self, k: int, shard: str) -> Path:
        return self.out / "_work" / f"pass{k}" / f"{shard}.keys.npz"

    def decision(self, k: int, shard: str) -> Path:
        return self.out / "_work" / f"pass{k}" / f"{shard}.decision.json"

    def marker(self, name: str, shard: str) -> Path:
        return self.out / "completions" / name / f"{shard}.json"


def marker_ok(marker: Path, data: Path) -> dict | None:
    """The marker's content if the marker exists and its shard still matches the recorded hash."""
    if not marker.exists():
        return None
    try:
        m = json.loads(marker.read_text())
    except ValueError:
        return None
    if m.get("docs") == 0 and not data.exists():
        return m
    return m if data.exists() and file_sha256(data) == m.get("sha256") else None


def _encode(docs: list[Document]) -> bytes:
    return "".join(json.dumps(d.to_record(), ensure_ascii=False) + "\n" for d in docs).encode("utf-8")


def write_validated(path: Path, payload: bytes, n_records: int) -> str:
    """Compress, write atomically, read back and check; returns the file's sha256."""
    atomic_write_bytes(path, zstandard.ZstdCompressor(level=3).compress(payload))
    with open_bytes(path) as f:
        back = f.read()
    if hashlib.sha256(back).digest() != hashlib.sha256(payload).digest() or back.count(b"\n") != n_records:
        path.unlink(missing_ok=True)
        raise OSError(f"{path}: shard failed validation after writing (disk full or corrupted?); rerun to resume")
    return file_sha256(path)


def _save_keys(path: Path, keys: list) -> None:
    lens = np.array([len(k) for k in keys], np.int64)
    flat = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
    buf = io.BytesIO()
    np.savez(buf, flat=flat, lens=lens)
    atomic_write_bytes(path, buf.getvalue())


def _load_keys(path: Path) -> list[np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        flat, lens = z["flat"], z["lens"]
    return np.split(flat, np.cumsum(lens)[:-1]) if len(lens) else []


def _commit(lay: Layout, k: int, shard: str, docs: list[Document], gstage, stats: dict, rejected=(),
            removed: list | None = None) -> None:
    data = lay.data(k, shard)
    if removed:  # the exclusion writer: validated like a shard, before the marker
        write_validated(lay.out / "removed" / f"{shard}.pass{k}.jsonl.zst",
                        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in removed).encode(), len(removed))
    sha = write_validated(data, _encode(docs), len(docs)) if docs else None
    if not docs:
        data.unlink(missing_ok=True)
    if gstage is not None:
        _save_keys(lay.keys(k, shard), gstage.keys_batch(docs))
    if k == 0 and rejected:
        atomic_write_bytes(lay.out / "rejected" / f"{shard}.jsonl",
                           "".join(json.dumps(r.to_record(), ensure_ascii=False) + "\n" for r in rejected).encode())
    atomic_write_json(lay.marker(f"pass{k}", shard), {"docs": len(docs), "sha256": sha, "stats": stats})


def _shard_stats(stages, rejected: list[Rejected], n_read: int | None = None) -> dict:
    out = {st.name: st.stats.to_dict() for st in stages}
    if n_read is not None:
        reasons: dict[str, int] = {}
        for r in rejected:
            reasons[r.reason] = reasons.get(r.reason, 0) + 1
        out = {"read": {"in": n_read, "out": n_read - len(rejected), "removed": reasons, "counters": {},
                        "scores": {}, "examples": {}}, **out}
    return out


def pass0_task(task: tuple) -> list[str]:
    """Read one input file (or every `stride`-th chunk of it) and run segment 0 on each chunk."""
    out, cfg, n_passes, file_idx, path, fmt, stride, offset = task
    lay, K = Layout(out, n_passes), int(cfg["docs_per_shard"])
    stages = _stages(cfg)
    seg_stages, gstage = segments(stages)[0]
    mine = lambda c: c % stride == offset  # noqa: E731
    done_cache: dict[int, bool] = {}

    def is_done(c: int) -> bool:
        if c not in done_cache:
            done_cache[c] = marker_ok(lay.marker("pass0", shard_name(file_idx, c)), lay.data(0, shard_name(file_idx, c))) is not None
        return done_cache[c]

    skip = lambda i: not mine(i // K) or is_done(i // K)  # noqa: E731
    written, cur, buf, rejected, n_read = [], -1, [], [], 0

    def flush():
        nonlocal buf
        for st in seg_stages:  # stage by stage over the chunk: lets stages vectorise (langid)
            buf = st.run_batch(buf)
        stats = _shard_stats(seg_stages + ([gstage] if gstage else []), rejected, n_read)
        _commit(lay, 0, shard_name(file_idx, cur), buf, gstage, stats, rejected, stages[0].removed_sink)
        written.append(shard_name(file_idx, cur))
        _reset(stages, cfg)

    for i, item in enumerate(read_any(path, fmt, skip, int(cfg["max_doc_bytes"]), cfg.get("separator"))):
        c = i // K
        if item is None:
            continue
        if c != cur:
            if cur >= 0:
                flush()
            cur, buf, rejected, n_read = c, [], [], 0
        n_read += 1
        if isinstance(item, Rejected):
            rejected.append(item)
            continue
        buf.append(item)
    if cur >= 0:
        flush()
    return written


def pass_task(task: tuple) -> str:
    """Pass k >= 1 on one shard: apply the previous global decision, run segment k, write keys."""
    out, cfg, n_passes, k, shard = task
    lay = Layout(out, n_passes)
    if marker_ok(lay.marker(f"pass{k}", shard), lay.data(k, shard)):
        return shard
    stages = _stages(cfg)
    segs = segments(stages)
    prev_global, (seg_stages, gstage) = segs[k - 1][1], segs[k]
    decisions = json.loads(lay.decision(k - 1, shard).read_text())
    src = lay.data(k - 1, shard)
    docs = []
    if src.exists():
        for d in read_any(str(src), "jsonl"):
            docs.append(d)
    if len(docs) != len(decisions):
        raise RuntimeError(f"{src}: {len(docs)} documents but {len(decisions)} decisions; delete {lay.out} and rerun")
    kept = [d for d in (prev_global.run_decided(doc, dec) for doc, dec in zip(docs, decisions)) if d is not None]
    for st in seg_stages:
        kept = st.run_batch(kept)
    _commit(lay, k, shard, kept, gstage, _shard_stats([prev_global, *seg_stages] + ([gstage] if gstage else []), []),
            removed=stages[0].removed_sink)
    return shard


def decide(lay: Layout, cfg: dict, k: int, shards: list[str]) -> None:
    """One global decision for the stage that ends segment k, written per shard."""
    done = lay.out / "completions" / f"decide{k}.json"
    if done.exists():
        return
    gstage = segments(_stages(cfg))[k][1]
    per_shard = [_load_keys(lay.keys(k, s)) for s in shards]
    flat = [key for keys in per_shard for key in keys]
    decisions = gstage.decide(flat)
    pos = 0
    for s, keys in zip(shards, per_shard):
        part = [d.tolist() if isinstance(d, np.ndarray) else d for d in decisions[pos: pos + len(keys)]]
        atomic_write_json(lay.decision(k, s), part)
        pos += len(keys)
    atomic_write_json(done, {"docs": len(flat), "removed": sum(d is not None for d in decisions)})


class LocalExecutor:
    """Runs tasks in `workers` processes (in-process when workers == 1); order of results is kept."""

    def __init__(self, workers: int = 1):
        self.workers = max(1, int(workers))

    def map(self, fn: Callable, tasks: list) -> list:
        if self.workers == 1 or len(tasks) <= 1:
            return [fn(t) for t in tasks]
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with ctx.Pool(min(self.workers, len(tasks))) as pool:
            return pool.map(fn, tasks, chunksize=1)


def pass0_tasks(out: str, cfg: dict, n_passes: int, files: list[tuple[str, str]], workers: int) -> list[tuple]:
    stride = max(1, workers // max(len(files), 1))
    return [(str(out), cfg, n_passes, i, p, f, stride, o) for i, (p, f) in enumerate(files) for o in range(stride)]


def merge_stats(lay: Layout, stage_names: list[str], shards: list[str]) -> dict:
    per_stage: dict[str, list[dict]] = {}
    for k in range(lay.n_passes):
        for s in shards:
            m = json.loads(lay.marker(f"pass{k}", s).read_text())
            for name, st in m["stats"].items():
                per_stage.setdefault(name, []).append(st)
    order = ["read"] + stage_names
    return {name: StageStats.merge(per_stage[name]) for name in order if name in per_stage}


def clean(inputs: list[str], out: str | Path, config: dict | None = None, workers: int = 1, executor=None,
          code: bool = False, command: list[str] | None = None) -> dict:
    """Run the cleaning pipeline; resumes when DIR holds an interrupted run of the same config."""
    cfg = config if config is not None else load_config(None)
    out = Path(out)
    files = expand_inputs(inputs, code=code)
    if not files:
        raise ValueError(f"no input files found in {inputs}")
    cfg_path = out / "config.json"
    run_id = {"config": cfg, "inputs": files}
    if cfg_path.exists() and json.loads(cfg_path.read_text()) != json.loads(json.dumps(run_id, default=str)):
        raise ValueError(f"{out} holds a run with a different config or inputs; choose a new --output or delete it")
    if (out / "completions" / "run.json").exists():
        return json.loads((out / "stats.json").read_text())  # already complete: nothing to redo
    atomic_write_json(cfg_path, run_id)
    stages = _stages(cfg)  # built here so forked workers inherit loaded models and indexes
    n_passes = len(segments(stages))
    lay, ex = Layout(out, n_passes), executor or LocalExecutor(workers)
    ex.map(pass0_task, pass0_tasks(str(out), cfg, n_passes, files, ex.workers))
    shards = sorted(p.stem for p in (out / "completions" / "pass0").glob("*.json"))
    for k in range(1, n_passes):
        decide(lay, cfg, k - 1, shards)
        ex.map(pass_task, [(str(out), cfg, n_passes, k, s) for s in shards])
    stats = merge_stats(lay, [st.name for st in stages], shards)
    stats_public = {n: {k: v for k, v in s.items() if k not in ("scores", "examples")} for n, s in stats.items()}
    atomic_write_json(out / "stats.json", stats_public)
    from .report import write_report

    write_report(out / "report.html", stats, cfg)
    atomic_write_json(out / "completions" / "run.json", {"shards": len(shards)})
    shutil.rmtree(out / "_work", ignore_errors=True)
    write_manifest(out, "dataset", parents=[p for p, f in files if f not in ("hf",)], config=cfg,
                   command=command, extra={"shards": len(list((out / "data").glob("*.jsonl.zst")))})
    return stats_public
