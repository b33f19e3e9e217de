"""Training stability of survey §4.3.1 (E4): loss-spike and NaN/Inf detection, and mixed-precision scaling (F5).

Implements:
- `SpikeDetector`: an exponential moving average of the loss and of its variance; a step whose loss is
  NaN/Inf, or lies more than `zscore` EMA standard deviations above the EMA mean (after `min_steps` of
  history), is a spike. The trainer then rolls back to the last good checkpoint and skips the data
  window that produced it, as PaLM and OPT did by hand (PaLM: restart ~100 steps earlier and skip
  200-500 batches);
- `make_grad_scaler(dtype, device, init_scale, growth_interval)`: PyTorch's dynamic loss scaler for fp16
  (skip the step on inf/NaN gradients, halve the scale, double it after `growth_interval` clean steps in a
  row; Micikevicius et al. 2018), on CUDA and CPU alike; None for fp32/bf16, which need none.
"""
from __future__ import annotations

import math

import torch


class SpikeDetector:
    def __init__(self, zscore: float = 6.0, min_steps: int = 20, ema: float = 0.98):
        self.zscore, self.min_steps, self.ema = zscore, min_steps, ema
        self.mean, self.var, self.n = 0.0, 0.0, 0

    def check(self, loss: float) -> str | None:
        """'nan' / 'spike' when this loss must not be applied, else None (state is not changed)."""
        if not math.isfinite(loss):
            return "nan"
        if self.n >= self.min_steps:
            std = math.sqrt(max(self.var, 1e-12))
            if loss - self.mean > self.zscore * std:
                return "spike"
        return None

    def update(self, loss: float) -> None:
        if self.n == 0:
            self.mean, self.var = loss, 0.0
        else:
            d = loss - self.mean
            self.mean += (1 - self.ema) * d
            self.var = self.ema * (self.var + (1 - self.ema) * d * d)  # EMA variance (West 1979)
        self.n += 1

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "n": self.n}

    def load_state_dict(self, d: dict) -> None:
        self.mean, self.var, self.n = float(d["mean"]), float(d["var"]), int(d["n"])


def make_grad_scaler(dtype: str, device: torch.device, init_scale: float = 2.0 ** 16, growth_interval: int = 2000):
    """fp16 needs dynamic loss scaling (Micikevicius et al. 2018); bf16 has fp32's range and does not."""
    if dtype != "fp16":
        return None
    return torch.amp.GradScaler(device.type, init_scale=init_scale, growth_interval=growth_interval)
