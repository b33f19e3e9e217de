"""Learning signals, one per objective (D1-D3): a tiny model's loss falls below a bound within N steps."""
import math

import pytest
import torch

from llmkit.train.denoising import DenoisingLoader, special_vocab
from llmkit.train.trainer import Trainer
from tests.train.conftest import loaders, tiny_model, train_cfg

CASES = {
    # objective, architecture, steps, bound on the mean loss of the last 10 steps (ln V at start)
    "causal_lm": ("causal_lm", "decoder", 80, 1.6),
    "prefix_lm": ("prefix_lm", "prefix_decoder", 80, 1.8),
    "span_corruption_decoder": ("span_corruption", "decoder", 100, 2.6),
    "span_corruption_encdec": ("span_corruption", "encoder_decoder", 100, 3.0),
    "ul2_decoder": ("ul2", "decoder", 100, 2.6),
    "glm_decoder": ("glm", "decoder", 200, 3.4),  # (targets: 15% of the tokens, in spans, and [END]s)
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_objective_learns(case):
    objective, arch, steps, bound = CASES[case]
    vocab = 64 if objective in ("causal_lm", "prefix_lm") else special_vocab(64, 20)
    model = tiny_model(vocab_size=vocab, arch=arch, pos="rope" if arch != "encoder_decoder" else "t5",
                       d_model=48, max_seq_len=160, block_pos=objective == "glm")
    tr, _ = loaders(8, 48)
    if objective != "causal_lm":
        tr = DenoisingLoader(tr, objective, 64, encoder_decoder=arch == "encoder_decoder", n_sentinels=20, seed=1)
    losses = []
    cfg = train_cfg(max_steps=steps, micro_batch_size=8, seq_len=48, lr=1e-2, warmup_steps=10, optimizer="adamw",
                    weight_decay=0.0)
    Trainer(model, cfg, tr, hooks=[lambda t, r: losses.append(r["loss"])]).fit()
    assert losses[0] > math.log(vocab) - 0.5
    tail = sum(losses[-10:]) / 10
    assert tail < bound, (case, losses[0], tail)
