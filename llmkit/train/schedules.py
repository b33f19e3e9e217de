"""Learning-rate and batch-size schedules of survey §4.3.1 (E1, E2).

Implements, as pure functions of the step (so resuming needs no scheduler state beyond the step):
- linear warm-up then cosine decay to `min_lr_ratio * lr` (GPT-3: warm-up, cosine to 10% of max);
- linear decay to the minimum (Galactica);
- inverse square root after warm-up (T5 with Adafactor, PaLM): lr * sqrt(warmup / step);
- warmup-stable-decay (MiniCPM, "WSD"): constant after warm-up, then a linear decay over the last
  `wsd_decay_frac` of the run;
- constant (after warm-up);
- a GPT-3 style batch-size ramp: sequences per step grow linearly from a start value to the target,
  rounded to whole micro-batches.
"""
from __future__ import annotations

import math

from .config import TrainConfig


def lr_at(step: int, cfg: TrainConfig, base_lr: float | None = None) -> float:
    """Learning rate for optimiser step `step` (0-based)."""
    lr = cfg.lr if base_lr is None else base_lr
    lo = lr * cfg.min_lr_ratio
    w = cfg.warmup_steps
    if step < w:  # linear warm-up from lr/w to lr (step 0 is not a wasted zero-lr step, as in nanoGPT)
        return lr * (step + 1) / w
    horizon = cfg.decay_steps or cfg.max_steps
    if cfg.schedule == "constant":
        return lr
    if cfg.schedule == "inverse_sqrt":
        return max(lo, lr * math.sqrt(max(w, 1) / (step + 1)))
    if cfg.schedule == "wsd":
        decay_start = int(horizon * (1 - cfg.wsd_decay_frac))
        if step < decay_start:
            return lr
        frac = min(1.0, (step - decay_start) / max(1, horizon - 1 - decay_start))
        return lr - (lr - lo) * frac
    frac = min(1.0, (step - w) / max(1, horizon - 1 - w))  # reaches the minimum on the last step
    if cfg.schedule == "linear":
        return lr - (lr - lo) * frac
    return lo + 0.5 * (lr - lo) * (1 + math.cos(math.pi * frac))  # cosine


def batch_size_at(step: int, cfg: TrainConfig) -> int:
    """Sequences per optimiser step; a multiple of the micro-batch size."""
    target = cfg.global_batch
    if not cfg.batch_ramp_steps or step >= cfg.batch_ramp_steps:
        return target
    start = cfg.batch_ramp_start
    size = start + (target - start) * step / cfg.batch_ramp_steps
    mb = cfg.micro_batch_size
    return int(max(mb, min(target, round(size / mb) * mb)))


def accum_steps_at(step: int, cfg: TrainConfig) -> int:
    return batch_size_at(step, cfg) // cfg.micro_batch_size
