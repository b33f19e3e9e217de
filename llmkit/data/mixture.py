"""Data mixtures and curricula (survey §4.1.3 "Data scheduling": data mixture, data curriculum; §5.1.2 balancing).

Implements:
- `mixture_weights`: source proportions by tokens: explicit weights, or natural (p_i ∝ n_i), temperature sampling
  p_i ∝ w_i^(1/T) (mT5/XLM-R use it to up-sample small languages), and the T5 examples-proportional cap
  w_i = min(n_i, K);
- `MixtureSampler`: draws units (training windows or whole documents) from several sources so that the *tokens*
  follow the proportions; per-source caps (max_tokens, max_epochs), up-sampling by repeating a source over
  epochs (each epoch a fresh permutation) and down-sampling; staged curricula whose stage boundaries are token
  counts (e.g. general -> code/math -> long context); deterministic from a seed and resumable (`state_dict`),
  because draw k's random number depends only on (seed, k);
- `MixtureLoader`: the mixed counterpart of `shards.BatchLoader` (same batches, plus "source"), for the trainer;
- `llmkit data mix`: writes the mixed token dataset (whole documents, in the tokens format) or only a
  mixture spec (`mixture.json`) that `MixtureLoader.from_spec` reads.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .shards import BatchLoader, TokenDataset

RNG_BLOCK = 4096  # uniforms are generated in blocks of (seed, block index): draw k never depends on earlier draws


def mixture_weights(sizes, weights=None, temperature: float = 1.0, size_cap: float | None = None) -> np.ndarray:
    """Token proportions p_i ∝ base_i^(1/T) with base = weights, or min(sizes, size_cap) when weights is None."""
    base = np.asarray(sizes if weights is None else weights, dtype=np.float64)
    if weights is None and size_cap is not None:
        base = np.minimum(base, size_cap)
    if (base < 0).any() or base.sum() <= 0 or temperature <= 0:
        raise ValueError(f"mixture weights must be >= 0 with a positive sum and temperature > 0 "
                         f"(got {base.tolist()}, T={temperature})")
    p = np.where(base > 0, base, 0.0) ** (1.0 / temperature)
    return p / p.sum()


@dataclass
class Stage:
    """A curriculum stage: its weights hold until `until_tokens` tokens have been drawn in total (None: to the end)."""
    until_tokens: int | None
    weights: dict[str, float]


class MixtureSampler:
    """Draws (source, unit) pairs; units of source i have token lengths `unit_tokens[i]` (see module doc)."""

    def __init__(self, names: list[str], unit_tokens: list[np.ndarray], *, weights: dict[str, float] | None = None,
                 temperature: float = 1.0, size_cap: float | None = None, max_tokens: dict[str, int] | None = None,
                 max_epochs: dict[str, float] | None = None, stages: list[Stage] | None = None,
                 total_tokens: int | None = None, seed: int = 0):
        self.names, self.seed, self.total_tokens = list(names), seed, total_tokens
        self.lens = [np.asarray(u, dtype=np.int64) for u in unit_tokens]
        if any(len(u) == 0 for u in self.lens):
            raise ValueError(f"mixture source {names[[len(u) for u in self.lens].index(0)]!r} has no data")
        self.sizes = np.array([u.sum() for u in self.lens], dtype=np.float64)
        for d, what in ((weights, "weights"), (max_tokens, "max_tokens"), (max_epochs, "max_epochs")):
            unknown = set(d or {}) - set(names)
            if unknown:
                raise ValueError(f"{what} name unknown sources {sorted(unknown)}; sources are {names}")
        self.caps = np.full(len(names), np.inf)
        for i, n in enumerate(names):
            if max_tokens and n in max_tokens:
                self.caps[i] = min(self.caps[i], max_tokens[n])
            if max_epochs and n in max_epochs:
                self.caps[i] = min(self.caps[i], max_epochs[n] * self.sizes[i])
        self.stages = stages or [Stage(None, weights or {})]
        self.stage_p = [mixture_weights(self.sizes, [s.weights.get(n, 0.0) for n in names] if s.weights else None,
                                        temperature, size_cap) for s in self.stages]
        self.mean_len = self.sizes / np.array([len(u) for u in self.lens])
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}
        self._block = (-1, None)
        self.draws, self.tokens = 0, 0
        self.src_tokens = np.zeros(len(names), dtype=np.int64)
        self.src_units = np.zeros(len(names), dtype=np.int64)  # units drawn so far; epoch = units // n_units

    # -- one draw ----------------------------------------------------------------------------------------------
    def stage_index(self) -> int:
        for k, s in enumerate(self.stages):
            if s.until_tokens is None or self.tokens < s.until_tokens:
                return k
        return len(self.stages) - 1

    def _uniform(self, k: int) -> float:
        b = k // RNG_BLOCK
        if self._block[0] != b:
            self._block = (b, np.random.default_rng([self.seed, b]).random(RNG_BLOCK))
        return float(self._block[1][k % RNG_BLOCK])

    def _unit(self, i: int, n: int) -> int:
        """The n-th unit drawn from source i: epoch n // len, a fresh permutation per (seed, source, epoch)."""
        size = len(self.lens[i])
        epoch = n // size
        key = (i, epoch)
        if key not in self._perm_cache:
            if len(self._perm_cache) > 4 * len(self.names):
                self._perm_cache.clear()
            self._perm_cache[key] = np.random.default_rng([self.seed, 1 + i, epoch]).permutation(size)
        return int(self._perm_cache[key][n % size])

    def probabilities(self) -> np.ndarray:
        """Per-draw source probabilities now: stage weights over sources whose next unit fits under their cap,
        divided by mean unit length so that *tokens* (not units) follow the weights."""
        p = self.stage_p[self.stage_index()].copy()
        for i in range(len(p)):
            if p[i] > 0 and self.src_tokens[i] + self.lens[i][self._unit(i, int(self.src_units[i]))] > self.caps[i]:
                p[i] = 0.0
        q = p / self.mean_len
        return q / q.sum() if q.sum() > 0 else q

    def next(self) -> tuple[int, int] | None:
        """(source index, unit index), or None when every source is capped or total_tokens is reached."""
        if self.total_tokens is not None and self.tokens >= self.total_tokens:
            return None
        q = self.probabilities()
        if q.sum() == 0:
            return None
        i = int(np.searchsorted(np.cumsum(q), self._uniform(self.draws) * q.sum(), side="right"))
        i = min(i, len(q) - 1)
        while q[i] == 0:  # float round-off at the top end
            i -= 1
        u = self._unit(i, int(self.src_units[i]))
        n = int(self.lens[i][u])
        self.draws += 1
        self.tokens += n
        self.src_tokens[i] += n
        self.src_units[i] += 1
        return i, u

    def epochs(self) -> dict[str, float]:
        """Passes made over each source so far (> 1 means up-sampled)."""
        return {n: float(self.src_tokens[i] / self.sizes[i]) for i, n in enumerate(self.names)}

    def state_dict(self) -> dict:
        return {"draws": self.draws, "tokens": self.tokens, "src_tokens": self.src_tokens.tolist(),
                "src_units": self.src_units.tolist(), "seed": self.seed, "names": self.names}

    def load_state_dict(self, state: dict) -> None:
        if state["names"] != self.names or state["seed"] != self.seed:
            raise ValueError(f"mixture state is for sources {state['names']} seed {state['seed']}, not "
                             f"{self.names} seed {self.seed}: resume with the same mixture")
        self.draws, self.tokens = int(state["draws"]), int(state["tokens"])
        self.src_tokens = np.asarray(state["src_tokens"], dtype=np.int64)
        self.src_units = np.asarray(state["src_units"], dtype=np.int64)


class MixtureLoader:
    """Batches of windows drawn from several TokenDatasets by a MixtureSampler; the BatchLoader interface plus a
    "source" LongTensor[B]. Every rank replays the same global draw sequence and keeps its own B of each B*W
    draws, so ranks never overlap. Stops (StopIteration) when the mixture is exhausted."""

    def __init__(self, sources: dict[str, TokenDataset], batch_size: int, block_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, doc_info: bool = False, **mix):
        self.B, self.T, self.rank, self.world_size = int(batch_size), int(block_size), rank, world_size
        self.names = list(sources)
        # window orders come from the sampler; the per-source loaders only cut windows (batch_size 1, no shuffle)
        self.loaders = [BatchLoader(ds, 1, block_size, shuffle=False, doc_info=doc_info) for ds in sources.values()]
        lens = [np.full(lo.n_windows, block_size, dtype=np.int64) for lo in self.loaders]
        self.sampler = MixtureSampler(self.names, lens, seed=seed, **mix)

    @classmethod
    def from_spec(cls, spec: str | Path, batch_size: int, block_size: int, **kw) -> "MixtureLoader":
        """A loader from the mixture.json written by `llmkit data mix --spec-only`."""
        s = json.loads(Path(spec).read_text())
        sources = {src["name"]: TokenDataset(src["path"]) for src in s["sources"]}
        stages = [Stage(st["until_tokens"], st["weights"]) for st in s["stages"]] if s.get("stages") else None
        mix = {k: s.get(k) for k in ("weights", "temperature", "size_cap", "max_tokens", "max_epochs", "total_tokens")}
        mix["temperature"] = mix["temperature"] or 1.0
        return cls(sources, batch_size, block_size, seed=kw.pop("seed", s.get("seed", 0)), stages=stages, **mix, **kw)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        import torch

        rows, src = [], []
        for j in range(self.B * self.world_size):
            d = self.sampler.next()
            if d is None:
                raise StopIteration
            if self.rank * self.B <= j < (self.rank + 1) * self.B:
                rows.append(self.loaders[d[0]].batch([d[1]]))
                src.append(d[0])
        out = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
        out["source"] = torch.tensor(src, dtype=torch.long)
        return out

    def state_dict(self) -> dict:
        return {**self.sampler.state_dict(), "batch_size": self.B, "block_size": self.T, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        for k, mine in (("batch_size", self.B), ("block_size", self.T), ("world_size", self.world_size)):
            if state.get(k, mine) != mine:
                raise ValueError(f"mixture loader state has {k}={state[k]}, this loader {mine}: resume with the same "
                                 f"settings")
        self.sampler.load_state_dict(state)


# -- llmkit data mix --------------------------------------------------------------------------------------------
def _doc_lengths(ds: TokenDataset) -> np.ndarray:
    s = ds.doc_starts
    if s is None:
        raise ValueError(f"{ds}: mixing whole documents needs document boundaries (a dir from `llmkit data tokenize`)")
    return np.diff(np.append(s, len(ds)))


def mix_to_dir(sources: dict[str, str | Path], out_dir: str | Path, *, shard_tokens: int = 1 << 24,
               command: list[str] | None = None, **mix) -> dict:
    """Write the mixed dataset as whole documents in the tokens format; returns per-source statistics."""
    from ..artifacts import atomic_write_bytes, atomic_write_json, write_manifest
    from ..tokenizer import Tokenizer

    dss = {n: TokenDataset(p) for n, p in sources.items()}
    first = next(iter(dss.values()))
    for n, ds in dss.items():
        if (ds.meta.get("eos_id"), ds.meta.get("dtype")) != (first.meta.get("eos_id"), first.meta.get("dtype")):
            raise ValueError(f"source {n!r} ({sources[n]}) was tokenized with another tokenizer (eos/dtype differ); "
                             f"re-tokenize all sources with the same --tokenizer")
    starts = {n: ds.doc_starts for n, ds in dss.items()}
    sampler = MixtureSampler(list(dss), [_doc_lengths(ds) for ds in dss.values()], **mix)
    if sampler.total_tokens is None and np.isinf(sampler.caps).any():
        raise ValueError("the mixed dataset needs an end: give --tokens N, or caps (--max-epochs/--max-tokens) on "
                         "every source")
    out, dt = Path(out_dir), np.dtype(first.meta["dtype"]).newbyteorder("<")
    out.mkdir(parents=True, exist_ok=True)
    shards, buf, idx = [], [], [0]
    names = list(dss)

    def flush():
        k = len(shards)
        atomic_write_bytes(out / f"shard_{k:05d}.bin", np.concatenate(buf).astype(dt).tobytes())
        atomic_write_bytes(out / f"shard_{k:05d}.idx", np.asarray(idx, "<i8").tobytes())
        shards.append({"file": f"shard_{k:05d}.bin", "n_tokens": int(idx[-1]), "n_docs": len(idx) - 1})
        buf.clear()
        idx[:] = [0]

    while (d := sampler.next()) is not None:
        ds, s = dss[names[d[0]]], starts[names[d[0]]]
        a = int(s[d[1]])
        buf.append(ds.tokens(a, int(sampler.lens[d[0]][d[1]])))
        idx.append(idx[-1] + len(buf[-1]))
        if idx[-1] >= shard_tokens:
            flush()
    if len(idx) > 1:
        flush()
    stats = {"tokens": sampler.tokens, "docs": sampler.draws, "per_source": {
        n: {"tokens": int(sampler.src_tokens[i]), "share": float(sampler.src_tokens[i] / max(sampler.tokens, 1)),
            "epochs": sampler.epochs()[n]} for i, n in enumerate(names)}}
    meta = {**{k: first.meta[k] for k in ("dtype", "eos_id", "vocab_size") if k in first.meta},
            "n_tokens": sampler.tokens, "n_docs": sampler.draws, "shards": shards, "mixture": stats}
    tok_dir = Path(sources[names[0]]) / "tokenizer"
    if tok_dir.exists():
        Tokenizer.load(tok_dir).save(out / "tokenizer")
        meta["tokenizer"] = "tokenizer"
    atomic_write_json(out / "tokens.json", meta)
    write_manifest(out, "tokens", parents=[Path(p) for p in sources.values()], command=command,
                   config={"sources": {n: str(p) for n, p in sources.items()}, **_jsonable(mix)})
    return stats


def _jsonable(mix: dict) -> dict:
    return {k: ([vars(s) for s in v] if k == "stages" and v else v) for k, v in mix.items()}


def _kv(items: list[str], what: str, cast=float) -> dict:
    out = {}
    for it in items or []:
        name, sep, val = it.partition("=")
        if not sep:
            raise ValueError(f"{what} {it!r}: expected NAME=VALUE")
        out[name] = cast(val)
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="llmkit data mix", description="mix token datasets by token proportions")
    p.add_argument("--source", action="append", required=True, metavar="NAME=DIR[:WEIGHT]",
                   help="a token dir from `llmkit data tokenize`; repeat per source")
    p.add_argument("--out", required=True, help="output token dir (or mixture.json path with --spec-only)")
    p.add_argument("--tokens", type=int, help="total tokens to draw")
    p.add_argument("--temperature", type=float, default=1.0, help="p_i ∝ w_i^(1/T); T>1 flattens toward uniform")
    p.add_argument("--size-cap", type=float, help="T5 examples-proportional cap K: natural weights min(n_i, K)")
    p.add_argument("--max-tokens", action="append", default=[], metavar="NAME=N")
    p.add_argument("--max-epochs", action="append", default=[], metavar="NAME=E")
    p.add_argument("--stages", help='curriculum JSON: [{"until_tokens": N, "weights": {"web": 1}}, ...]')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spec-only", action="store_true", help="write mixture.json for MixtureLoader.from_spec")
    a = p.parse_args(argv)
    sources, weights = {}, {}
    for s in a.source:
        name, _, rest = s.partition("=")
        path, _, w = rest.rpartition(":") if ":" in rest else (rest, "", "")
        sources[name] = path
        if w:
            weights[name] = float(w)
    stages = None
    if a.stages:
        raw = json.loads(Path(a.stages).read_text() if Path(a.stages).exists() else a.stages)
        stages = [Stage(st.get("until_tokens"), st["weights"]) for st in raw]
    mix = {"weights": weights or None, "temperature": a.temperature, "size_cap": a.size_cap,
           "max_tokens": _kv(a.max_tokens, "--max-tokens", int) or None,
           "max_epochs": _kv(a.max_epochs, "--max-epochs") or None, "stages": stages, "total_tokens": a.tokens,
           "seed": a.seed}
    if a.spec_only:
        spec = {"sources": [{"name": n, "path": str(Path(pth).resolve())} for n, pth in sources.items()],
                **_jsonable(mix)}
        dss = {n: TokenDataset(pth) for n, pth in sources.items()}
        sampler = MixtureSampler(list(dss), [np.array([len(d)]) for d in dss.values()],
                                 **{k: v for k, v in mix.items() if k != "total_tokens"})
        spec["resolved_weights"] = [dict(zip(sampler.names, p.round(6).tolist())) for p in sampler.stage_p]
        from ..artifacts import atomic_write_json

        atomic_write_json(a.out, spec)
        print(json.dumps({"spec": a.out, "resolved_weights": spec["resolved_weights"]}))
        return 0
    stats = mix_to_dir(sources, a.out, command=["llmkit", "data", "mix", *argv], **mix)
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
