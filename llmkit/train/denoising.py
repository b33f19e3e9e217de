"""Denoising objectives of survey §4.2.3 (D2, D3): T5 span corruption, GLM blank infilling and the UL2 mixture.

Implements:
- `random_spans_noise_mask(L, rate, mean_span, rng)`: T5's sampler (Raffel et al. 2020,
  `random_spans_noise_mask`): round(L*rate) noise tokens in round(noise/mean_span) spans, span and gap
  lengths drawn as random partitions, the sequence starting with a non-noise gap;
- `span_corrupt(tokens, mask, sentinels)`: inputs with every noise span replaced by one sentinel,
  targets = sentinel_0 span_0 sentinel_1 span_1 ... (sentinels unique, in order); `reconstruct` inverts it;
- the UL2 denoisers (Tay et al. 2022): R (mean span 3 and 8, rate 0.15), S (prefix LM, the last 25% is
  the target), X (spans 3/8 at rate 0.5, span 64 at rates 0.15/0.5), each example prefixed by its
  paradigm token [R]/[S]/[X], sampled from a configurable mixture (default: uniform over the 7);
- GLM's autoregressive blank infilling (Du et al. 2022, `glm_example`): span lengths drawn from Poisson(3)
  (lengths >= 1, at most 40) until 15% of the tokens are covered, placed at random with at least one kept token
  between spans (GLM's `sample_spans`); Part A = the text with each span replaced by one [MASK]; Part B = the spans
  in a random order, each read as [START] span and predicted as span [END]. Part A attends bidirectionally, Part B
  to Part A and causally to itself (a prefix-LM mask over [A | B]); 2D positions: every Part B token takes its
  [MASK]'s position in Part A (`positions`) and its place in the span, 1.., as `block_positions` (0 in Part A),
  which a model reads with `block_pos: true` (without it the loader leaves them out: GLM's ablation without 2D
  positions). With `glm_gmask_prob` a row takes GLM's document-level objective instead: one span, the last
  50-100% of the text, behind a [gMASK] (GLM-130B trains on both). `glm_reconstruct` inverts either;
- layouts for both model kinds: decoder-only = [mode] inputs targets with a bidirectional prefix and loss
  on the targets only; encoder-decoder = encoder reads [mode] inputs, decoder predicts the targets;
- `DenoisingLoader`: wraps a token loader (e.g. `BatchLoader`), re-using its windows. Every row's noise is drawn
  from an RNG seeded by (seed, epoch, the row's window index; its tokens for a loader that gives no index), so a
  window is corrupted the same way whatever micro-batch, rank or pipeline split it travels in (accumulation and
  every distributed layout see the one-process data), and two windows with the same tokens (a duplicated
  document, a periodic stream) are corrupted differently; rows are padded to the window length, so every batch
  has the base loader's shape (static shapes for pipeline stages and torch.compile). Resumable through
  `state_dict()`.

Special ids live above the tokenizer's vocabulary: [R], [S], [X] = base, base+1, base+2 and sentinel i =
base + 3 + i; GLM's [MASK], [START], [END], [gMASK] take the first four sentinel ids.
`special_vocab(base, n_sentinels)` gives the model's vocabulary size.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from .objectives import IGNORE, prefix_lm_batch

MODES = ("R", "S", "X")


@dataclass(frozen=True)
class Denoiser:
    mode: str  # R, S or X
    mean_span: float = 3.0
    rate: float = 0.15


UL2_DENOISERS = (Denoiser("R", 3, 0.15), Denoiser("R", 8, 0.15), Denoiser("S", 0, 0.25),
                 Denoiser("X", 3, 0.5), Denoiser("X", 8, 0.5), Denoiser("X", 64, 0.15), Denoiser("X", 64, 0.5))
T5_DENOISER = Denoiser("R", 3, 0.15)  # T5: 15% corruption, mean span 3


SPECIAL_ID_OBJECTIVES = ("span_corruption", "ul2", "glm")  # the objectives whose ids live above the tokenizer's


def special_vocab(base: int, n_sentinels: int = 100) -> int:
    return base + 3 + n_sentinels


def _segment(n_items: int, n_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of a uniformly random partition of n_items into n_segments non-empty segments."""
    first = np.arange(n_items - 1) < n_segments - 1
    rng.shuffle(first)
    seg_id = np.cumsum(np.concatenate([[0], first]))
    return np.bincount(seg_id, minlength=n_segments)


def random_spans_noise_mask(length: int, rate: float, mean_span: float, rng: np.random.Generator) -> np.ndarray:
    n_noise = int(min(max(round(length * rate), 1), length - 1))
    n_spans = max(1, int(round(n_noise / mean_span)))
    n_spans = min(n_spans, n_noise, length - n_noise)
    noise = _segment(n_noise, n_spans, rng)
    keep = _segment(length - n_noise, n_spans, rng)
    starts = np.cumsum(np.stack([keep, noise], 1).reshape(-1))[:-1]
    ind = np.zeros(length, dtype=np.int64)
    ind[starts] = 1
    return (np.cumsum(ind) % 2) == 1


def span_corrupt(tokens: np.ndarray, mask: np.ndarray, sentinels) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets): each noise span -> one sentinel in the inputs; targets = sentinel_i + span_i, in order."""
    inputs, targets, i, k = [], [], 0, 0
    n = len(tokens)
    while i < n:
        if mask[i]:
            j = i
            while j < n and mask[j]:
                j += 1
            if k >= len(sentinels):
                raise ValueError(f"{k + 1} noise spans but only {len(sentinels)} sentinels; raise n_sentinels")
            inputs.append(sentinels[k])
            targets.append(sentinels[k])
            targets.extend(tokens[i:j].tolist())
            k, i = k + 1, j
        else:
            inputs.append(int(tokens[i]))
            i += 1
    return np.asarray(inputs, np.int64), np.asarray(targets, np.int64)


def reconstruct(inputs, targets, sentinels) -> list[int]:
    """Invert span_corrupt: put every target span back where its sentinel stands in the inputs."""
    pos = {s: i for i, s in enumerate(sentinels)}
    spans, cur = {}, None
    for t in targets:
        if int(t) in pos:
            cur = int(t)
            spans[cur] = []
        elif cur is not None:
            spans[cur].append(int(t))
    out = []
    for t in inputs:
        out.extend(spans[int(t)] if int(t) in pos else [int(t)])
    return out


def _n_spans(length: int, d: Denoiser) -> int:
    return max(1, int(round(max(1, round(length * d.rate)) / max(d.mean_span, 1))))


def denoise_example(tokens: np.ndarray, d: Denoiser, base: int, rng: np.random.Generator, n_sentinels: int,
                    budget: int, mode_token: bool) -> tuple[np.ndarray, np.ndarray]:
    """(inputs incl. the mode token, targets) whose decoder layout fits in `budget` tokens."""
    L = len(tokens)
    extra = 1 if mode_token else 0
    if d.mode == "S":
        L = min(L, budget - extra)
        n_t = max(1, int(round(L * d.rate)))
        inputs, targets = tokens[: L - n_t], tokens[L - n_t: L]
    else:
        while L > 2 and L + 2 * _n_spans(L, d) + extra > budget:  # sentinels appear once in each half
            L -= 1
        mask = random_spans_noise_mask(L, d.rate, d.mean_span, rng)
        inputs, targets = span_corrupt(tokens[:L], mask, [base + 3 + i for i in range(n_sentinels)])
    if mode_token:
        inputs = np.concatenate([[base + MODES.index(d.mode)], inputs])
    return inputs.astype(np.int64), targets.astype(np.int64)


# ---------------------------------------------------------------------------------------------- GLM
GLM_RATE, GLM_MEAN_SPAN, GLM_MAX_SPAN = 0.15, 3.0, 40
GLM_DOC_SPAN = (0.5, 1.0)  # GLM's document-level objective: one span of 50%-100% of the text


def glm_ids(base: int) -> tuple[int, int, int, int]:
    """[MASK], [START], [END], [gMASK]: the first four sentinel ids above the tokenizer's vocabulary."""
    return base + 3, base + 4, base + 5, base + 6


def glm_span_lengths(n_tokens: int, rng: np.random.Generator, rate: float = GLM_RATE, lam: float = GLM_MEAN_SPAN,
                     max_span: int = GLM_MAX_SPAN) -> list[int]:
    """Span lengths drawn from Poisson(lam) restricted to 1..max_span-1 until they cover int(n_tokens * rate)
    tokens (at least one span), as GLM's `block_length_distribution`."""
    k, p = _truncated_poisson(lam, max_span)
    lengths: list[int] = []
    while not lengths or sum(lengths) < int(n_tokens * rate):
        lengths.append(int(rng.choice(k, p=p)))
    return lengths


@lru_cache(maxsize=None)
def _truncated_poisson(lam: float, max_span: int) -> tuple[np.ndarray, np.ndarray]:
    """(1..max_span-1, their Poisson(lam) probabilities renormalised): computed once per setting, not per row."""
    k = np.arange(1, max_span)
    logp = np.array([i * math.log(lam) - lam - math.lgamma(i + 1) for i in k])
    p = np.exp(logp - logp.max())
    return k, p / p.sum()


def glm_place(length: int, lengths: list[int], rng: np.random.Generator) -> list[tuple[int, int]]:
    """(start, end) of each span in a text of `length` tokens: spans in the given order, at least one kept token
    between neighbours, the free tokens spread uniformly (GLM's `sample_spans`)."""
    free = length - sum(lengths) - (len(lengths) - 1)
    if free < 0:
        raise ValueError(f"{len(lengths)} spans of {sum(lengths)} tokens do not fit in {length} tokens")
    places = np.sort(rng.integers(0, free + 1, size=len(lengths)))
    spans, offset = [], 0
    for place, n in zip(places.tolist(), lengths):
        spans.append((offset + place, offset + place + n))
        offset += n + 1
    return spans


def glm_example(tokens: np.ndarray, rng: np.random.Generator, base: int, budget: int, rate: float = GLM_RATE,
                lam: float = GLM_MEAN_SPAN, gmask_prob: float = 0.0) -> dict:
    """One GLM row of at most `budget` tokens from the front of `tokens`: {'input_ids', 'labels', 'positions',
    'block_positions'} as int64 arrays of one length, and 'prefix_len' = len(Part A). With probability
    `gmask_prob` the row takes GLM's document-level objective instead: one span, the last 50-100% of the text,
    behind a [gMASK] (GLM-130B's long blanks at the end)."""
    mask_id, start_id, end_id, gmask_id = glm_ids(base)
    if budget < 4:
        raise ValueError(f"a GLM row needs a window of at least 4 tokens, got {budget}")
    L = min(len(tokens), budget - 2)
    if gmask_prob and rng.random() < gmask_prob:
        lo = max(1, math.ceil(GLM_DOC_SPAN[0] * L))
        n = int(rng.integers(lo, L + 1))
        return _glm_row(tokens, [(L - n, L)], [0], L, gmask_id, start_id, end_id)
    for _ in range(1000):  # the row holds L tokens and two more per span ([MASK] in A, [START] or [END] in B)
        lengths = glm_span_lengths(L, rng, rate, lam)
        if sum(lengths) + len(lengths) > L:  # no kept token left between the spans: draw again
            continue
        if L + 2 * len(lengths) <= budget:
            break
        L = budget - 2 * len(lengths)
    else:
        raise ValueError(f"no GLM spans at rate {rate} (mean {lam}) fit a window of {budget} tokens")
    rng.shuffle(lengths)
    spans = glm_place(L, lengths, rng)
    return _glm_row(tokens, spans, rng.permutation(len(spans)).tolist(), L, mask_id, start_id, end_id)


def _glm_row(tokens, spans, order, L: int, mask_id: int, start_id: int, end_id: int) -> dict:
    """Part A (the first L tokens, each span replaced by `mask_id`) then Part B (the spans in `order`)."""
    part_a, mask_pos, prev = [], [], 0
    for s, e in spans:
        part_a.extend(tokens[prev:s].tolist())
        mask_pos.append(len(part_a))
        part_a.append(mask_id)
        prev = e
    part_a.extend(tokens[prev:L].tolist())
    n_a = len(part_a)
    ids, labels = list(part_a), [IGNORE] * n_a
    pos, block = list(range(n_a)), [0] * n_a
    for j in order:  # Part B
        s, e = spans[j]
        span = tokens[s:e].tolist()
        ids += [start_id] + span
        labels += span + [end_id]
        pos += [mask_pos[j]] * (len(span) + 1)
        block += list(range(1, len(span) + 2))
    arr = {k: np.asarray(v, np.int64) for k, v in
           (("input_ids", ids), ("labels", labels), ("positions", pos), ("block_positions", block))}
    arr["prefix_len"] = n_a
    return arr


def glm_spans(ex: dict, base: int) -> dict[int, list[int]]:
    """The Part B spans of a GLM row, by the position of the [MASK] or [gMASK] each fills."""
    start_id = glm_ids(base)[1]
    ids, pos = np.asarray(ex["input_ids"]).tolist(), np.asarray(ex["positions"]).tolist()
    spans: dict[int, list[int]] = {}
    for t in range(int(ex["prefix_len"]), len(ids)):
        if ids[t] == start_id:
            cur = spans.setdefault(pos[t], [])
        else:
            cur.append(ids[t])
    return spans


def glm_reconstruct(ex: dict, base: int) -> list[int]:
    """The original tokens of a GLM row: every Part B span put back at the [MASK] or [gMASK] its positions point to."""
    mask_id, _, _, gmask_id = glm_ids(base)
    n_a = int(ex["prefix_len"])
    ids = np.asarray(ex["input_ids"]).tolist()
    fills = glm_spans(ex, base)
    out = []
    for t in range(n_a):
        out.extend(fills[t] if ids[t] in (mask_id, gmask_id) else [ids[t]])
    return out


def collate_glm(examples: list[dict], pad_id: int, length: int, block_positions: bool = True) -> dict:
    """GLM rows right-padded to `length` (no loss, position 0 on the padding); a bidirectional prefix over Part A."""
    B = len(examples)
    out = {"input_ids": torch.full((B, length), pad_id, dtype=torch.long),
           "labels": torch.full((B, length), IGNORE, dtype=torch.long),
           "positions": torch.zeros((B, length), dtype=torch.long)}
    if block_positions:
        out["block_positions"] = torch.zeros((B, length), dtype=torch.long)
    for r, ex in enumerate(examples):
        n = len(ex["input_ids"])
        if n > length:
            raise ValueError(f"a GLM row of {n} tokens exceeds the window of {length}")
        for k in out:
            out[k][r, :n] = torch.from_numpy(ex[k])
    out["prefix_len"] = torch.tensor([ex["prefix_len"] for ex in examples])
    return out


def collate_decoder(examples, pad_id: int, length: int | None = None) -> dict:
    """[inputs | targets] rows, right-padded to `length` tokens (default: the longest row); bidirectional prefix
    over the inputs; loss on targets only. The batch's input_ids are one token shorter than the rows."""
    seqs = [np.concatenate([i, t]) for i, t in examples]
    T = max(len(s) for s in seqs)
    if length is not None:
        if T > length:
            raise ValueError(f"a denoised row of {T} tokens exceeds the window of {length}")
        T = length
    tok = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for r, s in enumerate(seqs):
        tok[r, : len(s)] = torch.from_numpy(s)
    batch = prefix_lm_batch(tok, torch.tensor([len(i) for i, _ in examples]))
    for r, s in enumerate(seqs):
        batch["labels"][r, len(s) - 1:] = IGNORE  # padding
    return batch


def collate_encdec(examples, pad_id: int, start_id: int) -> dict:
    S = max(len(i) for i, _ in examples)
    T = max(len(t) for _, t in examples)
    B = len(examples)
    enc = torch.full((B, S), pad_id, dtype=torch.long)
    enc_mask = torch.zeros((B, S), dtype=torch.bool)
    dec = torch.full((B, T), pad_id, dtype=torch.long)
    lab = torch.full((B, T), IGNORE, dtype=torch.long)
    for r, (i, t) in enumerate(examples):
        enc[r, : len(i)], enc_mask[r, : len(i)] = torch.from_numpy(i), True
        dec[r, 0] = start_id
        dec[r, 1: len(t)] = torch.from_numpy(t[:-1])
        lab[r, : len(t)] = torch.from_numpy(t)
    return {"input_ids": dec, "labels": lab, "encoder_input_ids": enc, "encoder_attn_mask": enc_mask}


class DenoisingLoader:
    """Turns the windows of a token loader into span-corruption / UL2 / GLM / prefix-LM batches."""

    def __init__(self, base_loader, objective: str, base_vocab: int, *, encoder_decoder: bool = False,
                 seed: int = 0, n_sentinels: int = 100, mixture=None, pad_id: int = 0, start_id: int = 0,
                 block_positions: bool = True, glm_rate: float = GLM_RATE, glm_mean_span: float = GLM_MEAN_SPAN,
                 glm_gmask_prob: float = 0.0):
        self.base, self.objective, self.vocab = base_loader, objective, base_vocab
        self.encdec, self.seed, self.n_sentinels = encoder_decoder, seed, n_sentinels
        self.pad_id, self.start_id = pad_id, start_id
        self.block_positions = block_positions
        self.glm = (float(glm_rate), float(glm_mean_span), float(glm_gmask_prob))
        if objective == "glm":
            if encoder_decoder:
                raise ValueError("GLM blank infilling trains decoder-only models (Part A is the encoder's share)")
            if not 0 < self.glm[0] < 1 or self.glm[1] <= 0 or not 0 <= self.glm[2] <= 1:
                raise ValueError(f"data.glm_rate must lie in (0, 1), data.glm_mean_span be > 0 and "
                                 f"data.glm_gmask_prob in [0, 1], got {self.glm}")
            if n_sentinels < 4:
                raise ValueError(f"GLM's [MASK], [START], [END] and [gMASK] take 4 sentinel ids; "
                                 f"n_sentinels={n_sentinels}")
        elif objective == "ul2":
            self.denoisers = list(UL2_DENOISERS)
            w = np.asarray(mixture if mixture is not None else [1.0] * len(self.denoisers), dtype=np.float64)
            if len(w) != len(self.denoisers):
                raise ValueError(f"data.ul2_mixture needs {len(self.denoisers)} weights (R3,R8,S,X3,X8,X64/.15,X64/.5)")
            self.weights = w / w.sum()
        elif objective == "span_corruption":
            self.denoisers, self.weights = [T5_DENOISER], np.ones(1)
        elif objective != "prefix_lm":
            raise ValueError(f"DenoisingLoader does not build {objective!r}")

    def __iter__(self):
        return self

    def _rng(self, row: np.ndarray, epoch: int, window: int | None) -> np.random.Generator:
        """The row's own RNG, not its place in a batch: seeded by (seed, epoch, its window's index), or by its
        tokens when the base loader does not say which window it is."""
        if window is not None:
            return np.random.default_rng([self.seed, epoch, 1, int(window)])
        digest = hashlib.blake2b(np.ascontiguousarray(row, dtype=np.int64).tobytes(), digest_size=16).digest()
        return np.random.default_rng([self.seed, epoch, 0, *np.frombuffer(digest, dtype=np.uint32).tolist()])

    def __next__(self) -> dict:
        raw = next(self.base)
        epoch = int(getattr(self.base, "epoch", 0))  # (BatchLoader: the epoch of the batch just read)
        rows = torch.cat([raw["input_ids"], raw["labels"][:, -1:]], 1).numpy()
        windows = raw["window"].tolist() if "window" in raw else [None] * len(rows)
        rngs = [self._rng(r, epoch, w) for r, w in zip(rows, windows)]
        if self.objective == "prefix_lm":  # prefix length uniform in [1, T): every row keeps >= 1 target
            p = torch.tensor([int(g.integers(1, rows.shape[1] - 1)) for g in rngs])
            return prefix_lm_batch(torch.from_numpy(rows), p)
        if self.objective == "glm":  # rows of the batch's input length (the window minus its shifted target)
            ex = [glm_example(r, g, self.vocab, rows.shape[1] - 1, *self.glm) for r, g in zip(rows, rngs)]
            return collate_glm(ex, self.pad_id, rows.shape[1] - 1, self.block_positions)
        budget = rows.shape[1]
        examples = []
        for r, rng in zip(rows, rngs):
            d = self.denoisers[int(rng.choice(len(self.denoisers), p=self.weights))]
            examples.append(denoise_example(r, d, self.vocab, rng, self.n_sentinels, budget,
                                            mode_token=self.objective == "ul2"))
        if self.encdec:
            return collate_encdec(examples, self.pad_id, self.start_id)
        return collate_decoder(examples, self.pad_id, length=budget)

    def state_dict(self) -> dict:
        return {"base": self.base.state_dict()}  # (the noise needs no count: each row seeds its own)

    def load_state_dict(self, state: dict) -> None:
        self.base.load_state_dict(state["base"])


def wrap_objective(objective: str, train, val, mcfg, data: dict, seed: int):
    """Loaders for a recipe's objective (causal_lm passes through; others wrap the token loaders)."""
    if objective == "causal_lm":
        return train, val
    base = int(data.get("base_vocab") or mcfg.vocab_size - (3 + int(data.get("n_sentinels", 100))))
    if objective == "glm" and mcfg.pos in ("alibi", "t5"):
        raise ValueError(f"objective glm places each span at its [MASK] through position ids, which pos={mcfg.pos} "
                         "does not read (its biases follow the row order); use rope, learned or sinusoidal")
    if objective in SPECIAL_ID_OBJECTIVES and mcfg.vocab_size < special_vocab(base, int(data.get("n_sentinels", 100))):
        raise ValueError(f"model.vocab_size={mcfg.vocab_size} has no room for [R]/[S]/[X] and sentinels above "
                         f"{base}; set model.vocab_size={special_vocab(base, int(data.get('n_sentinels', 100)))}")
    kw = dict(encoder_decoder=mcfg.arch == "encoder_decoder", n_sentinels=int(data.get("n_sentinels", 100)),
              mixture=data.get("ul2_mixture"), pad_id=mcfg.pad_token_id or 0,
              start_id=mcfg.decoder_start_token_id or 0, block_positions=mcfg.block_pos,
              glm_rate=float(data.get("glm_rate", GLM_RATE)),
              glm_mean_span=float(data.get("glm_mean_span", GLM_MEAN_SPAN)),
              glm_gmask_prob=float(data.get("glm_gmask_prob", 0.0)))
    return (DenoisingLoader(train, objective, base, seed=seed, **kw),
            DenoisingLoader(val, objective, base, seed=seed + 1, **kw))
