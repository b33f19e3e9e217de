"""Survey Table 5 rows as TrainConfig presets (golden values from SURVEY_CHECKLIST §11)."""
import pytest

from llmkit.train.schedules import batch_size_at, lr_at
from llmkit.train.table5 import TABLE5, table5_config


def test_gpt3_row():
    cfg, dropout = table5_config("gpt3-175b", seq_len=2048, micro_batch_size=1, max_steps=10_000)
    assert (cfg.lr, cfg.optimizer, cfg.dtype, cfg.weight_decay, cfg.grad_clip) == (6e-5, "adamw", "fp16", 0.1, 1.0)
    assert cfg.betas == (0.9, 0.95) and cfg.eps == 1e-8 and dropout is None
    assert batch_size_at(0, cfg) * 2048 == pytest.approx(32e3, rel=0.05)  # 32K tokens at the start of the ramp
    assert batch_size_at(10_000, cfg) * 2048 == pytest.approx(3.2e6, rel=0.01)  # 3.2M after it
    assert lr_at(9_999, cfg) == pytest.approx(6e-6)  # cosine to 10%
    assert 10 <= cfg.warmup_steps <= 50  # 0.1-0.5% of the steps


def test_palm_row():
    cfg, dropout = table5_config("palm-540b", max_steps=10_000)
    assert cfg.optimizer == "adafactor" and cfg.schedule == "inverse_sqrt" and cfg.warmup_steps == 0
    assert cfg.dtype == "bf16" and cfg.grad_clip == 1.0 and dropout == 0.1
    assert cfg.lr * cfg.weight_decay == pytest.approx(1e-4)  # decoupled decay of lr^2 per step


@pytest.mark.parametrize("name", sorted(TABLE5))
def test_every_row_builds(name):
    r = TABLE5[name]
    cfg, dropout = table5_config(name, seq_len=2048, micro_batch_size=2, max_steps=1000)
    assert cfg.lr == r.lr and cfg.global_batch % 2 == 0 and dropout == r.dropout
    assert (cfg.warmup_steps > 0) == r.warmup
    if r.decay in ("cosine", "linear"):
        assert lr_at(999, cfg) == pytest.approx(0.1 * r.lr)


def test_unknown_row():
    with pytest.raises(ValueError, match="rows:"):
        table5_config("gpt5")
