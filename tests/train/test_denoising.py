"""D2/D3: T5 span corruption (rate, spans, sentinels, exact reconstruction) and the UL2 mixture of denoisers."""
import numpy as np
import pytest
import torch

from llmkit.data.shards import BatchLoader

from llmkit.train.denoising import (MODES, UL2_DENOISERS, Denoiser, DenoisingLoader, collate_decoder,
                                    collate_encdec, denoise_example, random_spans_noise_mask, reconstruct,
                                    span_corrupt)
from tests.train.conftest import loaders

SENT = list(range(1000, 1100))


def test_span_corruption_reconstructs_and_sentinels_unique_in_order():
    rng = np.random.default_rng(0)
    for _ in range(300):
        L = int(rng.integers(8, 200))
        toks = rng.integers(0, 500, size=L)
        mask = random_spans_noise_mask(L, 0.15, 3, rng)
        inp, tgt = span_corrupt(toks, mask, SENT)
        assert reconstruct(inp, tgt, SENT) == toks.tolist()
        s_in = [t for t in inp if t >= 1000]
        s_tg = [t for t in tgt if t >= 1000]
        assert s_in == s_tg == SENT[: len(s_in)]  # unique, in order, same in inputs and targets
        assert tgt[0] == SENT[0] and not mask[0]  # T5: a sequence starts with kept tokens


def test_noise_rate_and_mean_span_length():
    rng = np.random.default_rng(1)
    fracs, spans = [], []
    for _ in range(2000):
        m = random_spans_noise_mask(200, 0.15, 3, rng)  # 30 noise tokens in 10 spans (T5 rounds both counts)
        fracs.append(m.mean())
        edges = np.flatnonzero(np.diff(np.concatenate([[0], m.astype(int), [0]])))
        spans.extend((edges[1::2] - edges[::2]).tolist())
    assert abs(np.mean(fracs) - 0.15) < 0.005
    assert abs(np.mean(spans) - 3.0) < 1e-9 and np.std(spans) > 1  # random span lengths with mean 3


def test_ul2_mode_frequencies_rates_and_mode_token():
    rng = np.random.default_rng(2)
    base, counts, rates = 500, {m: 0 for m in MODES}, {d: [] for d in UL2_DENOISERS}
    w = np.ones(len(UL2_DENOISERS)) / len(UL2_DENOISERS)
    for _ in range(5000):
        d = UL2_DENOISERS[int(rng.choice(len(UL2_DENOISERS), p=w))]
        toks = rng.integers(0, 400, size=257)
        inp, tgt = denoise_example(toks, d, base, rng, 100, budget=400, mode_token=True)
        assert inp[0] == base + MODES.index(d.mode)  # the paradigm token is always present, first
        counts[d.mode] += 1
        n_target = sum(1 for t in tgt if t < base)
        rates[d].append(n_target / (n_target + sum(1 for t in inp[1:] if t < base)))
    freq = {m: c / 5000 for m, c in counts.items()}
    assert abs(freq["R"] - 2 / 7) < 0.02 and abs(freq["S"] - 1 / 7) < 0.02 and abs(freq["X"] - 4 / 7) < 0.02
    for d, r in rates.items():
        assert abs(np.mean(r) - d.rate) < 0.02, (d, np.mean(r))


def test_decoder_layout_loss_on_targets_only():
    ex = [(np.array([7, 1, 2, 1000]), np.array([1000, 3, 4])), (np.array([7, 5, 1000]), np.array([1000, 6]))]
    b = collate_decoder(ex, pad_id=0)
    assert b["prefix_len"].tolist() == [4, 3]
    assert b["input_ids"][0].tolist() == [7, 1, 2, 1000, 1000, 3]
    assert b["labels"][0].tolist() == [-100, -100, -100, 1000, 3, 4]
    assert b["labels"][1].tolist() == [-100, -100, 1000, 6, -100, -100]  # padding carries no loss


def test_encoder_decoder_layout():
    ex = [(np.array([7, 1, 2, 1000]), np.array([1000, 3, 4])), (np.array([7, 5, 1000]), np.array([1000, 6]))]
    b = collate_encdec(ex, pad_id=0, start_id=9)
    assert b["encoder_input_ids"][1].tolist() == [7, 5, 1000, 0] and b["encoder_attn_mask"][1].tolist() == [1, 1, 1, 0]
    assert b["input_ids"][0].tolist() == [9, 1000, 3] and b["labels"][0].tolist() == [1000, 3, 4]
    assert b["labels"][1].tolist() == [1000, 6, -100]


def test_denoising_loader_is_deterministic_and_resumable():
    tr, _ = loaders(4, 32)
    a = DenoisingLoader(tr, "ul2", 64, seed=3)
    next(a)
    state = a.state_dict()
    want = next(a)
    tr2, _ = loaders(4, 32)
    b = DenoisingLoader(tr2, "ul2", 64, seed=3)
    b.load_state_dict(state)
    got = next(b)
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert want["input_ids"].shape == (4, 32)  # padded to the window: the base loader's shape, every batch


def test_decoder_layout_pads_to_the_window():
    ex = [(np.array([7, 1, 1000]), np.array([1000, 3]))]
    b = collate_decoder(ex, pad_id=0, length=8)
    assert b["input_ids"].tolist() == [[7, 1, 1000, 1000, 3, 0, 0]] and b["prefix_len"].tolist() == [3]
    assert b["labels"].tolist() == [[-100, -100, 1000, 3, -100, -100, -100]]


@pytest.mark.parametrize("objective", ["ul2", "span_corruption", "prefix_lm"])
def test_rows_are_denoised_alike_in_any_micro_batch_split(objective):
    """A row's noise depends on the seed, the epoch and its tokens, not on its place in a batch: one batch of 8
    equals two micro-batches of 4 over the same windows (what accumulation, a pipeline or two data-parallel ranks
    read), in every denoiser's layout; and a new epoch draws new noise for the same window (64-token windows: T5's
    sampler puts a lone noise span at the end, so 32-token windows, with one span, would be corrupted alike)."""
    ds = loaders(8, 64)[0].ds
    one = DenoisingLoader(BatchLoader(ds, 8, 64, seed=0), objective, 64, seed=5, n_sentinels=20)
    two = DenoisingLoader(BatchLoader(ds, 4, 64, seed=0), objective, 64, seed=5, n_sentinels=20)
    a, b, c = next(one), next(two), next(two)
    for k in a:
        assert torch.equal(a[k], torch.cat([b[k], c[k]])), k
    ranks = [DenoisingLoader(BatchLoader(ds, 4, 64, seed=0, rank=r, world_size=2), objective, 64, seed=5,
                             n_sentinels=20) for r in range(2)]
    r0, r1 = next(ranks[0]), next(ranks[1])
    windows = np.concatenate([ranks[0].base.windows(0)[:4], ranks[1].base.windows(0)[:4]])
    whole = next(DenoisingLoader(iter([ranks[0].base.batch(windows)]), objective, 64, seed=5, n_sentinels=20))
    for k in whole:
        assert torch.equal(whole[k], torch.cat([r0[k], r1[k]])), k
    loader = DenoisingLoader(BatchLoader(ds, 8, 64, seed=0, shuffle=False), objective, 64, seed=5, n_sentinels=20)
    first = next(loader)  # windows 0-7 of epoch 0 ...
    for _ in range(len(loader.base) - 1):
        next(loader)
    again = next(loader)  # ... and of epoch 1
    assert loader.base.epoch == 1
    assert not torch.equal(first["input_ids"], again["input_ids"]) or not torch.equal(first["labels"], again["labels"])


def test_custom_denoiser_span_lengths():
    rng = np.random.default_rng(4)
    d = Denoiser("X", 8, 0.5)
    lens = []
    for _ in range(500):
        inp, tgt = denoise_example(rng.integers(0, 400, 257), d, 500, rng, 100, budget=10_000, mode_token=True)
        sent = [i for i, t in enumerate(tgt) if t >= 503] + [len(tgt)]
        lens.extend(np.diff(sent) - 1)
    assert abs(np.mean(lens) - 8) < 0.5
