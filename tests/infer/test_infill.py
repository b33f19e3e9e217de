"""GLM blank infilling at inference (`llmkit.infer.infill.fill_blanks`): the cached step-by-step fill equals the
model's full forward over the filled row, and a model trained with `objective: glm` fills held-out blanks."""
import numpy as np
import pytest
import torch

from llmkit.data.shards import BatchLoader, TokenDataset
from llmkit.infer.infill import fill_blanks
from llmkit.train.denoising import DenoisingLoader, glm_example, glm_ids, glm_spans, special_vocab
from llmkit.train.trainer import Trainer
from tests.train.conftest import tiny_model, train_cfg

BASE = 64


def _row(part_a: list[int], fills: list[list[int]], blanks: list[int], block: bool) -> dict:
    """The GLM training row of Part A and its filled spans (in text order), as the full forward reads it."""
    _, start_id, _, _ = glm_ids(BASE)
    ids, pos, blk = list(part_a), list(range(len(part_a))), [0] * len(part_a)
    for p, span in zip(blanks, fills):
        ids += [start_id] + span
        pos += [p] * (len(span) + 1)
        blk += list(range(1, len(span) + 2))
    t = lambda v: torch.tensor([v])  # noqa: E731
    return dict(input_ids=t(ids), positions=t(pos), block_positions=t(blk) if block else None,
                prefix_len=torch.tensor([len(part_a)]))


@pytest.mark.parametrize("block", [True, False])
def test_cached_fill_equals_the_full_forward(block):
    model = tiny_model(vocab_size=special_vocab(BASE, 8), block_pos=block, max_seq_len=96).eval()
    mask_id, _, end_id, gmask_id = glm_ids(BASE)
    part_a = [5, 9, mask_id, 12, 3, 7, mask_id, 30, 2, gmask_id]
    out, fills = fill_blanks(model, part_a, BASE, max_new=6)
    blanks = [2, 6, 9]
    assert len(fills) == 3 and all(len(f) <= 6 for f in fills)
    assert out == part_a[:2] + fills[0] + part_a[3:6] + fills[1] + part_a[7:9] + fills[2]
    row = _row(part_a, fills, blanks, block)
    logits = model(row.pop("input_ids"), **row)[0]
    picks = logits.argmax(-1).tolist()
    at = len(part_a)
    for span in fills:  # each span token is the full forward's greedy pick at the position before it
        assert picks[at:at + len(span)] == span
        assert len(span) == 6 or picks[at + len(span)] == end_id  # and the span ended with [END] or the cap
        at += len(span) + 1


def _runs(n: int, seed: int) -> np.ndarray:
    """Counting runs a, a+1, ..., a+k-1 (random a < 40, 8 <= k <= 16): a blank inside a run is fixed by its
    neighbours; one across a run's end is not. No two windows repeat (unlike a periodic stream, whose repeated
    windows would be corrupted alike within an epoch and memorised)."""
    rng, out = np.random.default_rng(seed), []
    while len(out) < n:
        a, k = int(rng.integers(0, 40)), int(rng.integers(8, 17))
        out.extend(range(a, a + k))
    return np.asarray(out[:n])


@pytest.mark.slow
def test_a_glm_trained_model_fills_held_out_blanks():
    mask_id = glm_ids(BASE)[0]
    model = tiny_model(vocab_size=special_vocab(BASE, 8), block_pos=True, d_model=64, max_seq_len=96)
    untrained = tiny_model(seed=1, vocab_size=special_vocab(BASE, 8), block_pos=True, d_model=64, max_seq_len=96)
    loader = BatchLoader(TokenDataset(arrays=[_runs(20000, 0).astype(np.uint16)], eos_id=63), 8, 48, seed=0)
    cfg = train_cfg(max_steps=800, micro_batch_size=8, seq_len=48, lr=1e-2, warmup_steps=20, optimizer="adamw",
                    weight_decay=0.0)
    Trainer(model, cfg, DenoisingLoader(loader, "glm", BASE, n_sentinels=8, seed=1)).fit()
    held_out, rng = _runs(5000, 1), np.random.default_rng(123)
    exact = {"trained": 0, "untrained": 0}
    n = 0
    for _ in range(30):
        s = int(rng.integers(0, len(held_out) - 49))
        ex = glm_example(held_out[s:s + 49].astype(np.int64), rng, BASE, 48)
        ids, n_a = ex["input_ids"].tolist(), ex["prefix_len"]
        truth = glm_spans(ex, BASE)  # each blank's true span, by its [MASK]'s position
        blanks = [i for i, t in enumerate(ids[:n_a]) if t == mask_id]
        n += len(blanks)
        for name, m in (("trained", model), ("untrained", untrained)):
            _, fills = fill_blanks(m, ids[:n_a], BASE, max_new=8)
            exact[name] += sum(f == truth[b] for b, f in zip(blanks, fills))
    # (measured: 25 of 62 blanks exactly right; a blank across a run's end cannot be filled from context)
    assert exact["trained"] >= 0.3 * n and exact["untrained"] <= 0.05 * n, (exact, n)
