"""E1/E2: learning-rate schedules and the batch-size ramp at chosen steps."""
import math

import pytest

from llmkit.train.config import TrainConfig
from llmkit.train.schedules import accum_steps_at, batch_size_at, lr_at


def cfg(**kw):
    return TrainConfig(**{"max_steps": 1000, "lr": 6e-4, "warmup_steps": 10, "min_lr_ratio": 0.1, **kw})


def test_cosine_warmup_peak_and_floor():
    c = cfg(schedule="cosine")
    assert lr_at(0, c) == pytest.approx(6e-5)  # 1/10 of the warm-up
    assert lr_at(4, c) == pytest.approx(3e-4)
    assert lr_at(9, c) == pytest.approx(6e-4)  # end of warm-up = max
    mid = 10 + (999 - 10) / 2
    assert lr_at(int(mid), c) == pytest.approx(0.5 * (6e-4 + 6e-5), rel=2e-3)
    assert lr_at(999, c) == pytest.approx(6e-5)  # GPT-3: cosine to 10% of max
    vals = [lr_at(s, c) for s in range(10, 1000)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))  # monotone decay after warm-up


def test_linear_decay():
    c = cfg(schedule="linear")
    assert lr_at(9, c) == pytest.approx(6e-4)
    assert lr_at(999, c) == pytest.approx(6e-5)
    assert lr_at(10 + 989 // 2, c) == pytest.approx(6e-4 - (6e-4 - 6e-5) * (989 // 2) / 989)


def test_inverse_sqrt():
    c = cfg(schedule="inverse_sqrt", min_lr_ratio=0.0)
    assert lr_at(9, c) == pytest.approx(6e-4)
    assert lr_at(39, c) == pytest.approx(6e-4 * math.sqrt(10 / 40))
    assert lr_at(999, c) == pytest.approx(6e-4 * math.sqrt(10 / 1000))


def test_wsd():
    c = cfg(schedule="wsd", wsd_decay_frac=0.2)
    assert lr_at(500, c) == 6e-4 and lr_at(799, c) == 6e-4  # stable phase
    assert lr_at(999, c) == pytest.approx(6e-5)
    assert 6e-5 < lr_at(900, c) < 6e-4


def test_constant_and_decay_horizon():
    assert lr_at(500, cfg(schedule="constant")) == 6e-4
    c = cfg(schedule="cosine", decay_steps=100)
    assert lr_at(99, c) == pytest.approx(6e-5) and lr_at(500, c) == pytest.approx(6e-5)


def test_batch_ramp():
    c = TrainConfig(micro_batch_size=4, batch_size=32, batch_ramp_steps=100, batch_ramp_start=4)
    assert batch_size_at(0, c) == 4 and accum_steps_at(0, c) == 1
    assert batch_size_at(50, c) == 16  # 4 + 28*0.5 = 18 sequences -> 4.5 micro-batches -> rounds (half to even) to 4
    assert batch_size_at(75, c) == 24  # 25 -> 6.25 micro-batches -> 6
    assert batch_size_at(100, c) == 32 and accum_steps_at(100, c) == 8
    sizes = [batch_size_at(s, c) for s in range(0, 120)]
    assert all(s % 4 == 0 for s in sizes) and all(a <= b for a, b in zip(sizes, sizes[1:]))


def test_bad_config_messages():
    with pytest.raises(ValueError, match="multiple of"):
        TrainConfig(micro_batch_size=3, batch_size=8)
    with pytest.raises(ValueError, match="choose one of"):
        TrainConfig(schedule="exp")
