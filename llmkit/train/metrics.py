"""Observability of a training run (survey §4.3): metrics.jsonl, TensorBoard, W&B, progress bar, FLOPs and MFU.

Implements:
- `step_flops(cfg, tokens, seq_len, enc_tokens, enc_len)` / `batch_flops(cfg, batch)` / `flops_per_token(cfg,
  seq_len)`: training FLOPs, 6*N per position (the matmul weights it passes: MoE counts its routed experts, an
  encoder-decoder its encoder's weights per encoder position and its decoder's per decoder position) plus the
  attention score/value matmuls, 6*L*T*d_attn per token for causal self-attention (Kaplan et al. 2020; the PaLM
  appendix B count) and all S keys for cross-attention and the encoder; the Trainer's MFU sums it over the
  step's real batches;
- `measured_peak_flops(dtype, device)`: the machine's own matmul peak, measured once (MFU is
  reported against what the hardware really does, not a datasheet);
- `MetricsLogger`: one JSON object per logged step in `RUN_DIR/metrics.jsonl` (`step`, `loss`,
  `val_loss`, `tokens_per_s`, `lr`, `wall_time`, ...), mirrored to TensorBoard when it is installed
  and to W&B when installed and asked for; `truncate(step)` drops lines after a resumed step;
- `Progress`: a tqdm bar with loss, tokens/s, MFU and ETA.
"""
from __future__ import annotations

import json
import math
import sys
import time
from functools import lru_cache
from pathlib import Path

import torch

from ..artifacts import atomic_write_text


def step_flops(cfg, tokens: int, seq_len: int, enc_tokens: int = 0, enc_len: int = 0,
               causal_exact: bool = True) -> float:
    """Training FLOPs (forward + backward = 3 x forward) of `tokens` decoder positions in sequences of `seq_len`
    and, for an encoder-decoder, `enc_tokens` encoder positions in sequences of `enc_len`: 2 per matmul weight a
    position passes (MoE: the experts it is routed to; the head included, not the embedding lookup; cross-attention
    projects keys and values from the encoder's positions) plus 4 x h x hd per (query, key) pair. The decoder's
    causal self-attention counts half its T keys (PaLM's 6 L T h hd per token); cross-attention and the encoder
    count all of theirs. causal_exact=False counts the dense T x T products."""
    from .scaling import encoder_side_params, matmul_params

    pair = 4 * cfg.n_heads * cfg.head_dim  # q.k and p.v, one multiply-add each
    enc_w = encoder_side_params(cfg)  # (the encoder's blocks and the cross-attention's key/value projections)
    self_keys = seq_len / 2 if causal_exact else seq_len
    fwd = tokens * (2 * (matmul_params(cfg) - enc_w) + cfg.n_layers * pair * self_keys)
    if cfg.arch == "encoder_decoder":
        fwd += tokens * cfg.n_layers * pair * enc_len  # cross-attention over the encoder's positions
        fwd += enc_tokens * (2 * enc_w + cfg.n_encoder_layers * pair * enc_len)
    return 3.0 * fwd


def batch_flops(cfg, batch: dict) -> float:
    """`step_flops` of one micro-batch (its decoder `input_ids` and any `encoder_input_ids`)."""
    ids, enc = batch["input_ids"], batch.get("encoder_input_ids")
    return step_flops(cfg, ids.numel(), ids.shape[1], enc.numel() if enc is not None else 0,
                      enc.shape[1] if enc is not None else 0)


def flops_per_token(cfg, seq_len: int) -> float:
    """Training FLOPs per token of sequences `seq_len` long (`step_flops` of one position; an encoder-decoder's
    encoder reads as many positions as its decoder)."""
    encdec = cfg.arch == "encoder_decoder"
    return step_flops(cfg, 1, seq_len, 1 if encdec else 0, seq_len if encdec else 0)


@lru_cache(maxsize=None)
def measured_peak_flops(dtype: str = "fp32", device: str = "cpu", n: int = 1024, seconds: float = 0.5) -> float:
    """FLOP/s of a large square matmul on this machine (the denominator of MFU)."""
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    if device.startswith("cuda"):
        n = 8192
    a = torch.randn(n, n, dtype=dt, device=device)
    b = torch.randn(n, n, dtype=dt, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def products_per_s(window: float) -> float:
        reps, t0 = 0, time.perf_counter()
        while (dt_s := time.perf_counter() - t0) <= window or reps == 0:
            a @ b
            sync()
            reps += 1
        return reps / dt_s

    products_per_s(seconds / 2)  # warm-up: an idle GPU's clocks ramp up over the first products
    # the best of five windows: a peak, not an average over a shared machine's stalls
    return 2.0 * n**3 * max(products_per_s(seconds / 5) for _ in range(5))


class MetricsLogger:
    def __init__(self, out_dir: str | Path | None, tensorboard: bool = True, wandb: bool = False,
                 wandb_project: str = "llmkit", config: dict | None = None, enabled: bool = True):
        self.out_dir = Path(out_dir) if out_dir else None
        self.enabled = enabled and self.out_dir is not None
        self.path = self.out_dir / "metrics.jsonl" if self.enabled else None
        if self.enabled:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.tb = self._tensorboard() if (self.enabled and tensorboard) else None
        self.wandb = self._wandb(wandb_project, config) if (self.enabled and wandb) else None

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return None
        return SummaryWriter(log_dir=str(self.out_dir / "tb"))

    def _wandb(self, project: str, config):
        try:
            import wandb
        except ImportError:
            print("llmkit: wandb is not installed; logging to metrics.jsonl and TensorBoard only", file=sys.stderr)
            return None
        return wandb.init(project=project, dir=str(self.out_dir), config=config)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        rec = {k: (float(v) if torch.is_tensor(v) else v) for k, v in record.items()}
        with open(self.path, "a") as f:  # strict JSON: inf / NaN (an fp16 overflow's grad norm) go as "inf" / "nan"
            f.write(json.dumps({k: str(v) if isinstance(v, float) and not math.isfinite(v) else v
                                for k, v in rec.items()}, allow_nan=False) + "\n")
        step = rec.get("step", 0)
        scalars = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and k != "step" and math.isfinite(v)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"train/{k}" if not k.startswith("val") else f"val/{k}", v, step)
            if "sample" in rec:
                self.tb.add_text("samples", str(rec["sample"]), step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def truncate(self, step: int) -> None:
        """Forget records logged after `step` (they are re-logged after a resume or a roll-back)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        atomic_write_text(self.path, "".join(ln + "\n" for ln in keep))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


_NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def read_metrics(run_dir: str | Path) -> list[dict]:
    """metrics.jsonl's records, with the "inf" / "nan" that `MetricsLogger.log` wrote back as floats."""
    p = Path(run_dir) / "metrics.jsonl"
    if not p.exists():
        return []
    return [{k: _NONFINITE[v] if isinstance(v, str) and v in _NONFINITE else v for k, v in json.loads(ln).items()}
            for ln in p.read_text().splitlines() if ln.strip()]


class Progress:
    """tqdm bar over optimiser steps: loss, tok/s, MFU; tqdm supplies the ETA."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(self, n: int, **stats) -> None:
        if self.bar is None:
            return
        self.bar.update(n)
        if stats:
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in stats.items()}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
