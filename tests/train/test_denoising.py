"""D2/D3: T5 span corruption (rate, spans, sentinels, exact reconstruction), GLM blank infilling (Poisson spans,
shuffled Part B, 2D positions, its attention through the model) and the UL2 mixture of denoisers."""
import math

import numpy as np
import pytest
import torch

from llmkit.data.shards import BatchLoader

from llmkit.train.denoising import (GLM_MAX_SPAN, MODES, UL2_DENOISERS, Denoiser, DenoisingLoader, collate_decoder,
                                    collate_encdec, denoise_example, glm_example, glm_ids, glm_reconstruct,
                                    glm_span_lengths, random_spans_noise_mask, reconstruct, span_corrupt,
                                    wrap_objective)
from tests.train.conftest import loaders, tiny_cfg, tiny_model

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


@pytest.mark.parametrize("objective", ["ul2", "span_corruption", "prefix_lm", "glm"])
def test_rows_are_denoised_alike_in_any_micro_batch_split(objective):
    """A row's noise depends on the seed, the epoch and its window, not on its place in a batch: one batch of 8
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


# ---------------------------------------------------------------------------------------------- GLM
def test_glm_span_lengths_follow_the_truncated_poisson_and_cover_the_rate():
    rng = np.random.default_rng(5)
    k = np.arange(1, GLM_MAX_SPAN)
    pmf = np.array([3.0 ** i * math.exp(-3.0) / math.factorial(i) for i in k])
    pmf /= pmf.sum()  # Poisson(3) on 1..39: mean 3/(1 - e^-3) = 3.157
    lengths = []
    for _ in range(40):  # ~470 spans per draw: the stopping rule's last, size-biased span weighs nothing
        draw = glm_span_lengths(10_000, rng)
        assert 1500 <= sum(draw) < 1500 + GLM_MAX_SPAN  # spans until 15% is covered, the last one overshooting
        lengths += draw
    counts = np.bincount(lengths, minlength=GLM_MAX_SPAN)[1:]
    assert abs(np.mean(lengths) - (pmf * k).sum()) < 0.05
    assert np.abs(counts / counts.sum() - pmf).max() < 0.01
    cover = [sum(glm_span_lengths(200, rng)) / 200 for _ in range(2000)]
    assert 0.15 <= min(cover) and 0.15 < np.mean(cover) < 0.17


def test_glm_rows_reconstruct_and_lay_out_part_a_and_shuffled_part_b():
    rng = np.random.default_rng(6)
    base = 500
    mask_id, start_id, end_id, _ = glm_ids(base)
    ascending = shuffled = 0
    for _ in range(400):
        T = int(rng.integers(8, 160))
        toks = rng.integers(0, base, size=T + 1)
        ex = glm_example(toks, rng, base, T)
        ids, lab, pos, blk = ex["input_ids"], ex["labels"], ex["positions"], ex["block_positions"]
        n_a = ex["prefix_len"]
        assert len(ids) == len(lab) == len(pos) == len(blk) <= T
        rec = glm_reconstruct(ex, base)
        assert rec == toks[: len(rec)].tolist()  # Part A with every span put back at its [MASK]
        a = ids[:n_a]
        masks = np.flatnonzero(a == mask_id)
        starts = np.flatnonzero(ids == start_id)
        assert len(masks) == len(starts) >= 1 and np.all(starts >= n_a)
        assert np.all(np.diff(masks) > 1)  # at least one kept token between two spans
        assert np.all(lab[:n_a] == -100) and pos[:n_a].tolist() == list(range(n_a)) and not blk[:n_a].any()
        ends = list(starts[1:]) + [len(ids)]
        for s, e in zip(starts, ends):  # one span: [START] x1..xl read at its mask, predicted as x1..xl [END]
            assert a[pos[s]] == mask_id and np.all(pos[s:e] == pos[s])
            assert blk[s:e].tolist() == list(range(1, e - s + 1))
            assert lab[s:e - 1].tolist() == ids[s + 1:e].tolist() and lab[e - 1] == end_id
        order = pos[starts].tolist()
        if len(order) > 1:
            ascending += order == sorted(order)
            shuffled += order != sorted(order)
    assert ascending > 0 and shuffled > ascending  # Part B's spans in a random order


def test_glm_document_level_rows_fill_one_long_blank_behind_gmask():
    """GLM's document-level objective (GLM-130B's [gMASK]): one span, the last 50-100% of the text, after a
    bidirectional prefix; mixed with the short blanks at `gmask_prob`."""
    rng = np.random.default_rng(8)
    base = 500
    mask_id, start_id, end_id, gmask_id = glm_ids(base)
    fractions, kinds = [], []
    for _ in range(2000):
        toks = rng.integers(0, base, size=65)
        ex = glm_example(toks, rng, base, 64, gmask_prob=0.3)
        ids, lab, pos, blk = ex["input_ids"], ex["labels"], ex["positions"], ex["block_positions"]
        n_a = ex["prefix_len"]
        rec = glm_reconstruct(ex, base)
        assert rec == toks[: len(rec)].tolist()
        is_g = gmask_id in ids
        kinds.append(is_g)
        if not is_g:
            continue
        assert ids[n_a - 1] == gmask_id and mask_id not in ids and len(rec) == 62  # the window, less [gMASK], [START]
        assert ids[n_a] == start_id and list(ids).count(start_id) == 1 and lab[-1] == end_id
        assert np.all(pos[n_a:] == n_a - 1) and blk[n_a:].tolist() == list(range(1, len(ids) - n_a + 1))
        fractions.append((len(ids) - n_a - 1) / len(rec))
    assert abs(np.mean(kinds) - 0.3) < 0.03
    assert min(fractions) >= 0.5 and max(fractions) == 1.0 and abs(np.mean(fractions) - 0.75) < 0.02


def test_glm_attention_is_bidirectional_on_part_a_and_causal_on_part_b():
    """Through a real model: Part A's outputs see all of Part A and none of Part B; a Part B token sees Part A and
    the Part B tokens before it only; the block positions change Part B's outputs, and none equals zeros."""
    base = 40
    model = tiny_model(vocab_size=base + 8, block_pos=True, n_layers=2).eval()
    rng = np.random.default_rng(7)
    ex = glm_example(rng.integers(0, base, 33), rng, base, 32, rate=0.3)
    n_a, n = ex["prefix_len"], len(ex["input_ids"])
    batch = {k: torch.from_numpy(v)[None] for k, v in ex.items() if k != "prefix_len"}

    def out(**change):
        b = {**batch, **change}
        return model(b["input_ids"], positions=b["positions"], block_positions=b.get("block_positions"),
                     prefix_len=torch.tensor([n_a]))[0]

    ref = out()

    def poke(t):
        ids = batch["input_ids"].clone()
        ids[0, t] = (ids[0, t] + 1) % base
        return out(input_ids=ids)

    last_a, mid_b = poke(n_a - 1), poke(n_a + (n - n_a) // 2)
    assert not torch.allclose(last_a[0], ref[0])  # the first token of Part A sees the last one
    assert torch.allclose(mid_b[:n_a + (n - n_a) // 2], ref[:n_a + (n - n_a) // 2], atol=1e-6)  # nothing sees ahead
    assert not torch.allclose(mid_b[-1], ref[-1])  # a later Part B token sees an earlier one
    zeros = out(block_positions=torch.zeros_like(batch["block_positions"]))
    assert torch.allclose(zeros[:n_a], ref[:n_a], atol=1e-6) and not torch.allclose(zeros[n_a:], ref[n_a:])
    assert torch.equal(out(block_positions=None), zeros)


def test_glm_loader_batches_and_refusals():
    tr, _ = loaders(4, 32)
    b = next(DenoisingLoader(tr, "glm", 64, n_sentinels=8, seed=0))
    assert {k: tuple(v.shape) for k, v in b.items()} == {"input_ids": (4, 32), "labels": (4, 32), "positions": (4, 32),
                                                         "block_positions": (4, 32), "prefix_len": (4,)}
    assert (b["input_ids"] >= 64).any() and ((b["labels"] != -100).sum(1) > 0).all()
    tr, _ = loaders(4, 32)
    assert "block_positions" not in next(DenoisingLoader(tr, "glm", 64, seed=0, block_positions=False))
    with pytest.raises(ValueError, match="decoder-only"):
        DenoisingLoader(tr, "glm", 64, encoder_decoder=True)
    with pytest.raises(ValueError, match="glm_rate"):
        DenoisingLoader(tr, "glm", 64, glm_rate=1.5)
    with pytest.raises(ValueError, match="4 sentinel ids"):
        DenoisingLoader(tr, "glm", 64, n_sentinels=3)
    with pytest.raises(ValueError, match="pos=alibi"):
        wrap_objective("glm", tr, tr, tiny_cfg(vocab_size=64 + 3 + 8, pos="alibi"), {"n_sentinels": 8}, 0)
    # a recipe's data options reach both loaders; the block positions follow the model's block_pos
    data = {"n_sentinels": 8, "glm_rate": 0.2, "glm_mean_span": 4, "glm_gmask_prob": 0.3}
    for block in (True, False):
        train, val = wrap_objective("glm", tr, tr, tiny_cfg(vocab_size=64 + 3 + 8, block_pos=block), data, 0)
        assert train.glm == val.glm == (0.2, 4.0, 0.3) and train.block_positions is val.block_positions is block


@pytest.mark.parametrize("objective", ["glm", "span_corruption", "prefix_lm"])
def test_repeated_windows_get_their_own_noise(objective):
    """Rows are seeded by their window's index, not by their tokens: in a stream that repeats every window (a
    duplicated document, a periodic corpus), the copies in one batch are corrupted differently. (Seeded by tokens,
    all 8 copies came out alike, and a model memorised the few masks it saw instead of learning to fill blanks.)"""
    from llmkit.data.shards import TokenDataset

    stream = np.tile(np.arange(64, dtype=np.uint16), 20)  # (64 tokens: T5's sampler puts one span in 32 alike)
    loader = BatchLoader(TokenDataset(arrays=[stream], eos_id=63), 8, 64, seed=0, shuffle=False)
    raw = loader.batch(range(8))
    assert all(torch.equal(raw["input_ids"][0], r) for r in raw["input_ids"])  # eight copies of one window
    b = next(DenoisingLoader(loader, objective, 64, n_sentinels=8, seed=0))
    key = "prefix_len" if objective == "prefix_lm" else "input_ids"
    assert len({tuple(r.tolist()) for r in b[key].reshape(8, -1)}) > 1
    no_index = {k: v for k, v in raw.items() if k != "window"}  # a loader that gives no index: seeded by tokens
    c = next(DenoisingLoader(iter([no_index]), objective, 64, n_sentinels=8, seed=0))
    assert len({tuple(r.tolist()) for r in c[key].reshape(8, -1)}) == 1
