"""E4: NaN and loss spikes -> roll back to the last good checkpoint, skip the data window, continue deterministically."""
import json

import torch

from llmkit.train.objectives import lm_loss
from llmkit.train.stability import SpikeDetector
from llmkit.train.trainer import Trainer
from tests.train.conftest import loaders, tiny_model, train_cfg


class Indexed:
    """A loader whose batches carry their index in the stream (to see which data was trained on)."""

    def __init__(self, base):
        self.base, self.i = base, 0

    def __iter__(self):
        return self

    def __next__(self):
        b = next(self.base)
        b["index"] = torch.tensor(self.i)
        self.i += 1
        return b

    def state_dict(self):
        return {"base": self.base.state_dict(), "i": self.i}

    def load_state_dict(self, s):
        self.base.load_state_dict(s["base"])
        self.i = s["i"]


def poisoned_loss(bad: dict, seen: list):
    """Batches listed in `bad` produce NaN ('nan') or a 50x loss ('spike'), as corrupt data would."""
    def fn(model, batch):
        i = int(batch["index"])
        seen.append(i)
        loss, m = lm_loss(model, batch)
        kind = bad.get(i)
        if kind == "nan":
            loss = loss * float("nan")
        elif kind == "spike":
            loss = loss * 50
        return loss, m
    return fn


def _run(tmp, bad):
    seen = []
    tr, _ = loaders(4, 16)
    cfg = train_cfg(max_steps=16, seq_len=16, ckpt_every=4, spike_detection=True, spike_min_steps=3,
                    spike_skip_window=1, keep_last=5)
    t = Trainer(tiny_model(), cfg, Indexed(tr), loss_fn=poisoned_loss(bad, seen), out_dir=tmp)
    out = t.fit()
    recs = [json.loads(x) for x in (tmp / "metrics.jsonl").read_text().splitlines()]
    return t, out, recs, seen


def test_nan_rolls_back_and_skips_window(tmp_path):
    t, out, recs, seen = _run(tmp_path / "a", {10: "nan"})
    ev = [r for r in recs if r.get("event") == "rollback"]
    assert len(ev) == 1 and ev[0]["reason"] == "nan" and ev[0]["step"] == 10
    assert ev[0]["restored_step"] == 8 and ev[0]["skipped_steps"] == [9, 10]
    # after the roll-back, steps 8.. train on 8, then (9, 10 skipped) 11, 12, ...
    after = seen[seen.index(10) + 1:]
    assert after[:3] == [8, 11, 12] and 9 not in after and 10 not in after
    assert [r["step"] for r in recs if "loss" in r and "event" not in r] == list(range(1, 17))
    assert all(torch.isfinite(p).all() for p in t.raw_model.parameters())
    # deterministic: the same run again gives the same losses
    _, out2, recs2, _ = _run(tmp_path / "b", {10: "nan"})
    assert [r.get("loss") for r in recs if "event" not in r] == [r.get("loss") for r in recs2 if "event" not in r]


def test_spike_detected_by_zscore(tmp_path):
    _, _, recs, seen = _run(tmp_path, {13: "spike"})
    ev = [r for r in recs if r.get("event") == "rollback"]
    assert len(ev) == 1 and ev[0]["reason"] == "spike" and ev[0]["restored_step"] == 12
    assert ev[0]["skipped_steps"] == [12, 13] and 13 not in seen[seen.index(13) + 1:]


def test_detector_statistics():
    d = SpikeDetector(zscore=4, min_steps=5, ema=0.9)
    for x in [3.0, 2.9, 2.95, 2.85, 2.9, 2.88]:
        assert d.check(x) is None
        d.update(x)
    assert d.check(float("inf")) == "nan" and d.check(float("nan")) == "nan"
    assert d.check(10.0) == "spike" and d.check(2.5) is None  # only upward jumps are spikes
    s = d.state_dict()
    e = SpikeDetector()
    e.load_state_dict(s)
    assert e.state_dict() == s
