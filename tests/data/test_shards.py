"""Token loader (llmkit.data.shards): windows, shuffling, resume, rank slicing, document info, on-disk shards."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llmkit.data.shards import BatchLoader, TokenDataset

EOS = 0


def _stream(n_docs=60, seed=0):
    rng = np.random.default_rng(seed)
    docs = [np.append(rng.integers(1, 500, size=rng.integers(5, 40)), EOS) for _ in range(n_docs)]
    starts = np.cumsum([0] + [len(d) for d in docs[:-1]])
    return np.concatenate(docs).astype(np.uint16), starts


def _ds(**kw):
    s, starts = _stream(**kw)
    return TokenDataset(arrays=[s], doc_starts=starts, eos_id=EOS), s


def test_unshuffled_windows_reproduce_the_stream():
    ds, s = _ds()
    T = 16
    loader = BatchLoader(ds, batch_size=4, block_size=T, shuffle=False)
    xs, ys = [], []
    for _ in range(len(loader)):
        b = next(loader)
        assert b["input_ids"].dtype == torch.long and b["input_ids"].shape == (4, T)
        xs.append(b["input_ids"].reshape(-1))
        ys.append(b["labels"].reshape(-1))
    n = len(loader) * 4 * T
    assert torch.equal(torch.cat(xs), torch.from_numpy(s[:n].astype(np.int64)))
    assert torch.equal(torch.cat(ys), torch.from_numpy(s[1:n + 1].astype(np.int64)))


def _epoch_windows(loader):
    rows = []
    for _ in range(len(loader)):
        rows.append(next(loader)["input_ids"])
    return torch.cat(rows)


def test_shuffle_is_a_permutation_and_depends_on_seed():
    ds, s = _ds()
    T = 8
    n_win = (len(s) - 1) // T
    base = BatchLoader(ds, batch_size=1, block_size=T, shuffle=False)
    all_rows = _epoch_windows(base)
    a = _epoch_windows(BatchLoader(ds, batch_size=1, block_size=T, seed=1))
    a2 = _epoch_windows(BatchLoader(ds, batch_size=1, block_size=T, seed=1))
    b = _epoch_windows(BatchLoader(ds, batch_size=1, block_size=T, seed=2))
    assert len(a) == n_win
    key = lambda rows: sorted(tuple(r.tolist()) for r in rows)  # noqa: E731
    assert key(a) == key(all_rows) == key(b)  # every window exactly once
    assert torch.equal(a, a2)
    assert not torch.equal(a, b) and not torch.equal(a, all_rows)


def test_next_epoch_reshuffles():
    ds, _ = _ds()
    lo = BatchLoader(ds, batch_size=2, block_size=8, seed=3)
    e0 = _epoch_windows(lo)
    e1 = _epoch_windows(lo)
    assert lo.epoch == 1 and not torch.equal(e0, e1)


@pytest.mark.parametrize("steps", [0, 5, 23, 50])  # 23 and 50 cross epoch boundaries (len 22)
def test_resume_mid_epoch_is_bitwise(steps):
    ds, _ = _ds()
    a = BatchLoader(ds, batch_size=4, block_size=16, seed=7, doc_info=True)
    assert len(a) == 22
    for _ in range(steps):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))  # survives a JSON round trip (checkpoint)
    b = BatchLoader(ds, batch_size=4, block_size=16, seed=7, doc_info=True)
    b.load_state_dict(state)
    for _ in range(15):
        x, y = next(a), next(b)
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k])


def test_resume_refuses_other_settings():
    ds, _ = _ds()
    a = BatchLoader(ds, batch_size=4, block_size=16, seed=7)
    b = BatchLoader(ds, batch_size=4, block_size=16, seed=8)
    with pytest.raises(ValueError, match="seed"):
        b.load_state_dict(a.state_dict())


def test_ranks_are_disjoint_and_cover_the_epoch():
    ds, s = _ds()
    T, W = 8, 3
    n_win = (len(s) - 1) // T
    seen = []
    for r in range(W):
        lo = BatchLoader(ds, batch_size=2, block_size=T, seed=5, rank=r, world_size=W)
        seen.append([int(w) for w in lo.windows(0)])
        assert len(lo) == (n_win // W) // 2
    flat = [w for ws in seen for w in ws]
    assert len(flat) == len(set(flat)) == (n_win // W) * W  # disjoint; only the remainder (< W) is dropped
    assert set(flat) | set(range(n_win)) == set(range(n_win)) and n_win - len(flat) < W
    # the union equals the single-rank epoch order (same permutation, interleaved)
    one = BatchLoader(ds, batch_size=1, block_size=T, seed=5).windows(0)[: len(flat)]
    assert sorted(flat) == sorted(int(w) for w in one)


def test_doc_info_positions_reset_after_eos():
    ds, s = _ds()
    T = 32
    lo = BatchLoader(ds, batch_size=4, block_size=T, seed=0, doc_info=True)
    b = next(lo)
    x, pos, doc = b["input_ids"], b["positions"], b["doc_ids"]
    for r in range(x.shape[0]):
        for t in range(1, T):
            if x[r, t - 1] == EOS:
                assert pos[r, t] == 0 and doc[r, t] == doc[r, t - 1] + 1
            else:
                assert pos[r, t] == pos[r, t - 1] + 1 and doc[r, t] == doc[r, t - 1]
        assert doc[r, 0] == 0


def test_split_cuts_at_a_document_boundary():
    ds, s = _ds()
    train, val = ds.split(0.1)
    assert len(train) + len(val) == len(s)
    assert s[len(train) - 1] == EOS  # train ends with a whole document
    assert abs(len(val) - 0.1 * len(s)) < 45
    assert np.array_equal(val.tokens(0, len(val)), s[len(train):])
    assert val.doc_starts[0] == 0 and len(train.doc_starts) + len(val.doc_starts) == len(ds.doc_starts)


def test_memmapped_shards_on_disk_span_boundaries(tmp_path):
    s, starts = _stream()
    cut = int(starts[25])
    for k, (a, b) in enumerate([(0, cut), (cut, len(s))]):
        s[a:b].astype("<u2").tofile(tmp_path / f"shard_{k:05d}.bin")
        idx = np.append(starts[(starts >= a) & (starts < b)] - a, b - a).astype("<i8")
        idx.tofile(tmp_path / f"shard_{k:05d}.idx")
    meta = {"dtype": "uint16", "eos_id": EOS, "shards": [{"file": f"shard_{k:05d}.bin"} for k in range(2)]}
    (tmp_path / "tokens.json").write_text(json.dumps(meta))
    ds = TokenDataset(tmp_path)
    assert len(ds) == len(s) and np.array_equal(ds.doc_starts, starts)
    assert np.array_equal(ds.tokens(cut - 5, 10), s[cut - 5:cut + 5])
    mem = TokenDataset(arrays=[s], doc_starts=starts)
    a = BatchLoader(ds, 4, 16, seed=1, doc_info=True)
    b = BatchLoader(mem, 4, 16, seed=1, doc_info=True)
    for _ in range(len(a)):
        x, y = next(a), next(b)
        assert all(torch.equal(x[k], y[k]) for k in x)
    # without the index, boundaries come from EOS tokens and agree
    for f in tmp_path.glob("*.idx"):
        f.unlink()
    assert np.array_equal(TokenDataset(tmp_path).doc_starts, starts)


def test_bad_shard_errors_name_the_file(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\x01\x00\x02")
    with pytest.raises(ValueError, match="a.bin"):
        TokenDataset([tmp_path / "a.bin"], dtype="uint16")
    with pytest.raises(FileNotFoundError, match="tokenize"):
        TokenDataset(tmp_path / "missing.bin")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="tokenize"):
        TokenDataset(empty)


def test_too_small_dataset_says_what_to_do():
    ds = TokenDataset(arrays=[np.arange(20, dtype=np.uint16)], eos_id=0)
    with pytest.raises(ValueError, match="smaller batch_size"):
        BatchLoader(ds, batch_size=4, block_size=16)
