"""Token shards and the pre-training token loader (survey §4.1.2 tokenization, §4.3 training data feed).

Implements:
- the on-disk token format written by `llmkit data tokenize` (see `llmkit.data.tokenize`): per shard a packed
  little-endian `shard_NNNNN.bin` (uint16 when the vocabulary fits, else uint32, EOS after every document), a
  `shard_NNNNN.idx` of int64 document start offsets (n_docs + 1 entries, the last one = n_tokens) and a
  `shard_NNNNN.done` completion marker; `tokens.json` lists the shards, dtype, eos id and vocabulary size;
- `TokenDataset`: one memory-mapped token stream over all shards (or over in-memory arrays), with document
  boundaries, and train/val splitting at a document boundary;
- `BatchLoader`: fixed-length windows of block_size + 1 tokens -> inputs/targets, shuffled by (seed, epoch),
  sliced over data-parallel ranks without overlap, resumable mid-epoch bit for bit (`state_dict()`);
- `dataset_from_texts`: build a TokenDataset in memory from a list of texts and a tokenizer (tests, demo).

Usage (the trainer's contract):

    ds = TokenDataset("runs/tokens")                     # dir written by `llmkit data tokenize`, or .bin files
    train, val = ds.split(val_fraction=0.01)            # cut at a document boundary
    loader = BatchLoader(train, batch_size=8, block_size=256, seed=0, rank=0, world_size=1)
    batch = next(loader)   # {"input_ids": LongTensor[B,T], "labels": LongTensor[B,T]} (+ "doc_ids", "positions")
    state = loader.state_dict()           # JSON-able; a new loader + load_state_dict(state) yields the same batches
    loader.epoch, loader.step, len(loader)  # len = batches per epoch for this rank

Window w of an epoch covers stream tokens [w*T, w*T + T + 1): inputs are the first T, labels the last T, so every
token is predicted exactly once per epoch. With `doc_info=True` a batch also carries `doc_ids` (document index
within the row, starting at 0) and `positions` (position inside its document, reset after every EOS), which the
trainer turns into a block-diagonal attention mask / position ids (document-aware masking).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

# torch is imported where batches are built, so `llmkit data tokenize` and its workers start without it

TOKENS_JSON = "tokens.json"


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 holds ids < 65536 (GPT-2 / Llama-2 sized vocabularies); larger ones need uint32."""
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


class TokenDataset:
    """A read-only token stream: memory-mapped shards (or arrays) concatenated, plus document start offsets."""

    def __init__(self, source: str | Path | Sequence[str | Path] | None = None, *, dtype: str | None = None,
                 eos_id: int | None = None, arrays: Sequence[np.ndarray] | None = None,
                 doc_starts: np.ndarray | None = None):
        self.meta: dict = {}
        if arrays is not None:
            self.arrays = [np.asarray(a) for a in arrays]
            starts = doc_starts
        else:
            if source is None:
                raise ValueError("TokenDataset needs a token directory, a list of .bin files, or arrays=")
            self.arrays, starts = self._open(source, dtype)
        self.eos_id = eos_id if eos_id is not None else self.meta.get("eos_id")
        sizes = np.array([len(a) for a in self.arrays], dtype=np.int64)
        self._cum = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.lo, self.hi = 0, int(self._cum[-1])
        if starts is None and self.eos_id is not None:
            starts = self._starts_from_eos()
        self._doc_starts = None if starts is None else np.asarray(starts, dtype=np.int64)

    # -- opening -----------------------------------------------------------------------------------------------
    def _open(self, source, dtype):
        if isinstance(source, (str, Path)) and Path(source).is_dir():
            d = Path(source)
            meta_path = d / TOKENS_JSON
            if meta_path.exists():
                self.meta = json.loads(meta_path.read_text())
                files = [d / s["file"] for s in self.meta["shards"]]
            else:
                files = sorted(d.glob("*.bin"))
            if not files:
                raise FileNotFoundError(f"{d}: no token shards (*.bin); run `llmkit data tokenize ... --out {d}` first")
        else:
            files = [Path(source)] if isinstance(source, (str, Path)) else [Path(f) for f in source]
            missing = [f for f in files if not f.exists()]
            if missing or not files:
                raise FileNotFoundError(f"{missing[0] if missing else 'no files'}: token shard not found; run "
                                        f"`llmkit data tokenize INPUT... --out DIR` and pass DIR")
            meta_path = files[0].parent / TOKENS_JSON
            if meta_path.exists():
                self.meta = json.loads(meta_path.read_text())
        name = dtype or self.meta.get("dtype")
        if name is None:
            raise ValueError(f"{files[0]}: unknown token dtype; pass dtype='uint16' or 'uint32' (no {TOKENS_JSON})")
        dt = np.dtype(name)
        arrays, starts, off = [], [], 0
        for f in files:
            if not f.exists():
                raise FileNotFoundError(f"{f}: token shard listed but missing; re-run `llmkit data tokenize` to resume")
            if f.stat().st_size % dt.itemsize:
                raise ValueError(f"{f}: size {f.stat().st_size} is not a multiple of {dt} ({dt.itemsize} bytes); "
                                 f"the shard is truncated or the dtype is wrong")
            a = np.memmap(f, dtype=dt.newbyteorder("<"), mode="r") if f.stat().st_size else np.zeros(0, dt)
            idx = f.with_suffix(".idx")
            if starts is not None and idx.exists():
                s = np.fromfile(idx, dtype="<i8")
                if len(s) == 0 or s[-1] != len(a):
                    raise ValueError(f"{idx}: document index does not end at the shard length {len(a)}")
                starts.append(s[:-1] + off)
            else:
                starts = None
            arrays.append(a)
            off += len(a)
        return arrays, (np.concatenate(starts) if starts else None)

    def _starts_from_eos(self) -> np.ndarray:
        """Without an index, a document starts at 0 and after every EOS."""
        ends = [np.flatnonzero(np.asarray(a) == self.eos_id) + c for a, c in zip(self.arrays, self._cum[:-1])]
        after = np.concatenate(ends) + 1 if ends else np.zeros(0, np.int64)
        return np.concatenate([[0], after[after < self._cum[-1]]]).astype(np.int64)

    # -- access -----------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.hi - self.lo

    def tokens(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) of this (view of the) stream, spanning shard boundaries."""
        if start < 0 or length < 0 or start + length > len(self):
            raise IndexError(f"tokens [{start}, {start + length}) outside a stream of {len(self)}")
        if length == 0:
            return np.zeros(0, dtype=self.arrays[0].dtype if self.arrays else np.uint16)
        a = self.lo + start
        b = a + length
        i = int(np.searchsorted(self._cum, a, side="right")) - 1
        parts = []
        while a < b:
            take = min(b, int(self._cum[i + 1])) - a
            off = a - int(self._cum[i])
            parts.append(np.asarray(self.arrays[i][off:off + take]))
            a += take
            i += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    @property
    def doc_starts(self) -> np.ndarray | None:
        """Start offsets of the documents that begin inside this view (relative to the view)."""
        if self._doc_starts is None:
            return None
        if getattr(self, "_view_starts", None) is None:  # computed once per view: the loader asks every batch
            s = self._doc_starts
            a, b = np.searchsorted(s, [self.lo, self.hi])
            s = s[a:b] - self.lo
            self._view_starts = s if len(s) and s[0] == 0 else np.concatenate([[0], s]).astype(np.int64)
        return self._view_starts

    @property
    def n_docs(self) -> int | None:
        s = self.doc_starts
        return None if s is None else len(s)

    def view(self, start: int, end: int) -> "TokenDataset":
        """A dataset over tokens [start, end) of this one, sharing the memory maps."""
        if not 0 <= start <= end <= len(self):
            raise IndexError(f"view [{start}, {end}) outside a stream of {len(self)}")
        v = object.__new__(TokenDataset)
        v.__dict__.update(self.__dict__)
        v.lo, v.hi, v._view_starts = self.lo + start, self.lo + end, None
        return v

    def split(self, val_fraction: float = 0.01) -> tuple["TokenDataset", "TokenDataset"]:
        """(train, val): the last `val_fraction` of the tokens, cut at the nearest document start if known."""
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        cut = int(round(len(self) * (1 - val_fraction)))
        s = self.doc_starts
        if s is not None and len(s) > 1:
            j = int(np.argmin(np.abs(s[1:] - cut))) + 1  # never cut at 0: train must be non-empty
            cut = int(s[j])
        return self.view(0, cut), self.view(cut, len(self))

    def __repr__(self) -> str:
        return f"TokenDataset({len(self)} tokens, {self.n_docs} docs, {len(self.arrays)} shards)"


def dataset_from_texts(texts: Iterable[str], tokenizer, eos_id: int | None = None) -> TokenDataset:
    """Tokenize texts in memory (EOS after each document) into a TokenDataset; `tokenizer` is an llmkit/HF-style
    object with `encode(text)` (no special tokens added) or a `tokenizers.Tokenizer`."""
    eos = eos_id if eos_id is not None else getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("dataset_from_texts: the tokenizer has no eos_token_id; pass eos_id=")
    texts = list(texts)
    if hasattr(tokenizer, "encode_batch"):  # llmkit Tokenizer (lists) or tokenizers.Tokenizer (Encodings)
        encs = tokenizer.encode_batch(texts, add_special_tokens=False)
    else:
        encs = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    docs = [list(getattr(e, "ids", e)) + [eos] for e in encs]
    ids = [i for d in docs for i in d]
    starts = np.cumsum([0] + [len(d) for d in docs[:-1]]) if docs else np.zeros(0, np.int64)
    vocab = getattr(tokenizer, "vocab_size", None)
    if vocab is None and hasattr(tokenizer, "get_vocab_size"):
        vocab = tokenizer.get_vocab_size()
    vocab = max(vocab or 0, max(ids) + 1 if ids else 1)  # HF's vocab_size leaves out added tokens
    arr = np.asarray(ids, dtype=dtype_for_vocab(int(vocab)))
    return TokenDataset(arrays=[arr], doc_starts=np.asarray(starts, np.int64), eos_id=eos)


class BatchLoader:
    """Shuffled fixed-length windows for causal-LM training; an infinite iterator over epochs (see module doc)."""

    def __init__(self, dataset: TokenDataset, batch_size: int, block_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, doc_info: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        self.ds, self.B, self.T = dataset, int(batch_size), int(block_size)
        self.seed, self.rank, self.world_size, self.shuffle, self.doc_info = seed, rank, world_size, shuffle, doc_info
        self.n_windows = (len(dataset) - 1) // self.T
        # every rank gets the same number of windows so ranks stay in lockstep (DDP); the remainder is dropped
        self.per_rank = self.n_windows // world_size
        if self.per_rank < self.B:
            raise ValueError(f"{len(dataset)} tokens give {self.n_windows} windows of {self.T}+1 tokens: fewer than "
                             f"batch_size={self.B} per rank (world_size={world_size}); use more data or a smaller "
                             f"batch_size/block_size")
        if doc_info and dataset.doc_starts is None:
            raise ValueError("doc_info=True needs document boundaries: a token dir with .idx files or an eos_id")
        self.epoch, self.step = 0, 0
        self._order_epoch, self._order = -1, None

    def __len__(self) -> int:
        return self.per_rank // self.B

    def windows(self, epoch: int) -> np.ndarray:
        """Window indices of this rank for `epoch`, in visiting order (a slice of one permutation of all windows)."""
        if self._order_epoch != epoch:
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            else:
                perm = np.arange(self.n_windows)
            self._order = perm[self.rank:self.per_rank * self.world_size:self.world_size]
            self._order_epoch = epoch
        return self._order

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.step >= len(self):
            self.epoch, self.step = self.epoch + 1, 0
        w = self.windows(self.epoch)[self.step * self.B:(self.step + 1) * self.B]
        self.step += 1
        return self.batch(w)

    def batch(self, windows: Sequence[int]) -> dict:
        """{"input_ids", "labels"} LongTensors [len(windows), T] (+ "doc_ids", "positions") for these windows, and
        "window" [len(windows)]: their indices (what a denoiser seeds each row's noise by)."""
        import torch

        rows = np.stack([self.ds.tokens(int(i) * self.T, self.T + 1) for i in windows]).astype(np.int64)
        x = torch.from_numpy(rows)
        out = {"input_ids": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous(),
               "window": torch.as_tensor(np.asarray(windows, np.int64))}
        if self.doc_info:
            out.update(self._doc_info(windows))
        return out

    def _doc_info(self, windows) -> dict:
        import torch

        starts = self.ds.doc_starts
        pos = np.asarray(windows, np.int64)[:, None] * self.T + np.arange(self.T)[None, :]
        doc = np.searchsorted(starts, pos, side="right") - 1
        return {"doc_ids": torch.from_numpy(doc - doc[:, :1]), "positions": torch.from_numpy(pos - starts[doc])}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "batch_size": self.B, "block_size": self.T,
                "n_windows": self.n_windows}

    def load_state_dict(self, state: dict) -> None:
        for k in ("seed", "batch_size", "block_size", "n_windows", "world_size"):
            mine = self.state_dict()[k]
            if state.get(k, mine) != mine:
                raise ValueError(f"loader state has {k}={state[k]} but this loader has {k}={mine}: "
                                 f"resume with the same data and settings")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
