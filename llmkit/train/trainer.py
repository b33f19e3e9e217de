"""The one training loop of llmkit (survey §4.3): pre-training, and every adaptation method of §5 on top.

API (adaptation methods are loss functions + collators for this class, never a second loop):

    trainer = Trainer(
        model,                 # nn.Module; called as loss_fn(model, batch)
        cfg,                   # TrainConfig (llmkit.train.config)
        train_data,            # iterator of *micro-batches* (dict of tensors) with state_dict()/load_state_dict()
                               #   e.g. llmkit.data.shards.BatchLoader; its state is the data position on resume
        loss_fn=None,          # (model, batch) -> (loss tensor, metrics dict); default: lm_loss with cfg.z_loss
        out_dir=None,          # run directory: metrics.jsonl, tb/, checkpoints/, report.html (None: in-memory run)
        val_data=None,         # iterable of batches for evaluate(); reset to its initial state before each eval
        params=None,           # trainable subset (e.g. LoRA adapters); default all requires_grad parameters
        dist=None,             # distributed setup (llmkit.train.distributed), see `Dist` below
        tokenizer=None,        # saved with checkpoints; used to print samples
        model_config=None,     # ModelConfig saved as config.json (default: model.cfg)
        hooks=None,            # callables hook(trainer, record) called after every logged step
    )
    trainer.fit()              # trains to cfg.max_steps, resuming from out_dir's latest checkpoint if resume=True
    trainer.evaluate()         # -> val loss over the targets of cfg.eval_batches batches

One optimiser step: draw `accum` micro-batches (the batch-size ramp sets how many), run forward/backward
on each under autocast, weight each micro-batch by its share of the step's target tokens on all
data-parallel ranks (so accumulation and data parallelism equal one big batch exactly), check the loss
for NaN/spikes (roll back + skip data), unscale (fp16), clip the global grad norm, step, set the
scheduled learning rate.

`Dist` protocol (all optional except rank/world_size): `rank`, `world_size`, `device`,
`wrap(model) -> model` (DDP / FSDP2 / TP applied from outside), `no_sync(model)` context for all
but the last micro-batch, `reduce_mean(tensor)` (the mean over ranks: logging, target-token weights),
`sync_grads(model)` after the step's backward passes, `clip_grad_norm(params, max_norm)`,
`model_state_dict(model)` / `load_model_state_dict(model, sd)` for sharded checkpoints, `barrier()`.
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
from torch import nn

from ..model.layers import fused_f32
from . import checkpoint as ckpt
from .config import TrainConfig
from .metrics import MetricsLogger, Progress, batch_flops, measured_peak_flops
from .objectives import IGNORE, make_loss_fn
from .optim import build_optimizer, named_trainable
from .schedules import accum_steps_at, lr_at
from .stability import SpikeDetector, make_grad_scaler

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class RollbackLimit(RuntimeError):
    pass


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each block's activations in the backward pass (F6); returns the number of blocks wrapped."""
    from torch.utils.checkpoint import checkpoint

    n = 0
    for stack in ("layers", "encoder"):
        for blk in getattr(model, stack, None) or []:
            inner = blk.forward

            def fwd(x, ctx, *delta, _inner=inner):
                return checkpoint(_inner, x, ctx, *delta, use_reentrant=False)

            blk.forward = fwd
            n += 1
    return n


def _floats(record: dict) -> dict:
    """A step's record with its metrics read off the device (one sync, at logging only)."""
    return {k: float(v) if torch.is_tensor(v) else v for k, v in record.items()}


class Trainer:
    def __init__(self, model: nn.Module, cfg: TrainConfig, train_data, loss_fn=None, out_dir=None, val_data=None,
                 params=None, dist=None, tokenizer=None, model_config=None, hooks=None, recipe: dict | None = None):
        self.cfg, self.dist, self.tokenizer, self.hooks = cfg, dist, tokenizer, list(hooks or [])
        self.device = getattr(dist, "device", None) or pick_device(cfg.device)
        self.rank, self.world = getattr(dist, "rank", 0), getattr(dist, "world_size", 1)
        self.dp_world = getattr(dist, "dp_world", self.world)  # ranks with their own data (TP peers share theirs)
        self.is_main = self.rank == 0
        self.raw_model = model.to(self.device)
        if self.device.type == "cuda":  # TF32 tensor cores for fp32 matmuls (nanoGPT / torchtitan default)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.model_config = model_config if model_config is not None else getattr(model, "cfg", None)
        self.recipe = recipe
        self.pipelined = hasattr(dist, "pipeline_step")  # llmkit.train.pipeline.PipelineDist: one stage per rank
        if self.pipelined and (loss_fn is not None or cfg.dtype == "fp16" or cfg.compile):
            raise ValueError("pipeline parallelism trains its last stage's causal-LM loss (no custom loss_fn), "
                             "without fp16 loss scaling (the schedule runs backward itself) and without "
                             "train.compile")
        if cfg.activation_checkpointing:
            apply_activation_checkpointing(self.raw_model)
        self.model = dist.wrap(self.raw_model) if dist is not None and hasattr(dist, "wrap") else self.raw_model
        # after wrapping: FSDP2 swaps parameters for sharded DTensors in place
        self.params = [p for _, p in named_trainable(self.raw_model, params)]
        self.optimizer = build_optimizer(self.raw_model, cfg, params)
        if cfg.compile:
            self.model = torch.compile(self.model)
        self.loss_fn = loss_fn or make_loss_fn("causal_lm", cfg.z_loss)
        self.train_data, self.val_data = train_data, val_data
        self._val_state = val_data.state_dict() if hasattr(val_data, "state_dict") else None
        self.out_dir = Path(out_dir) if out_dir else None
        self.ckpt_dir = self.out_dir / "checkpoints" if self.out_dir else None
        self.autocast = AUTOCAST[cfg.dtype]
        self.scaler = make_grad_scaler(cfg.dtype, self.device, cfg.loss_scale_init, cfg.loss_scale_growth_interval)
        self.detector = SpikeDetector(cfg.spike_zscore, cfg.spike_min_steps, cfg.spike_ema)
        self.step, self.tokens_seen, self.wall_offset = 0, 0, 0.0
        self.skip_windows: list[list[int]] = []  # [first_step, last_step] whose data is dropped after a roll-back
        self.rollbacks, self.history = 0, []
        self.logger = MetricsLogger(self.out_dir, cfg.tensorboard, cfg.wandb, cfg.wandb_project,
                                    config=self._config_dict(), enabled=self.is_main)
        self._peak = None
        self._grad_scale = None  # a pending clipping factor for the fused AdamW (`_clip`, `_apply`)

    # ------------------------------------------------------------------ helpers
    def _config_dict(self) -> dict:
        return {"train": self.cfg.to_dict(),
                "model": self.model_config.to_dict() if self.model_config is not None else None,
                "recipe": self.recipe}

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def _to_device(self, batch: dict) -> dict:
        return {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def set_lr(self, step: int) -> float:
        factor = lr_at(step, self.cfg) / self.cfg.lr
        for g in self.optimizer.param_groups:
            g["lr"] = g.get("base_lr", self.cfg.lr) * factor
        return lr_at(step, self.cfg)

    def _next_batches(self, step: int) -> list[dict]:
        for w in self.skip_windows:
            if w[0] == step and len(w) == 2:  # drop the data of the steps that produced a spike (PaLM / OPT)
                n = sum(accum_steps_at(s, self.cfg) for s in range(w[0], w[1] + 1))
                for _ in range(n):
                    next(self._it)
                w.append("applied")
        return [self._to_device(next(self._it)) for _ in range(accum_steps_at(step, self.cfg))]

    def _weights(self, batches: list[dict]) -> list:
        """Each micro-batch's weight: its share of the step's target tokens on all data-parallel ranks, times their
        number (data parallelism averages the ranks' gradients), so that accumulation and data parallelism equal
        one big batch also when labels are masked unevenly (-100 spans, prefix LM, denoisers)."""
        many = self.dist is not None and self.dp_world > 1 and hasattr(self.dist, "reduce_mean")
        if len(batches) == 1 and not many:  # (no count: on a GPU it would wait for the device)
            return [1.0]
        if not all("labels" in b for b in batches):
            return [1.0 / len(batches)] * len(batches)
        counts = torch.stack([(b["labels"] != IGNORE).sum() for b in batches]).float()
        # the mean over ranks of their step's target tokens (TP peers hold the same batch: they count alike);
        # on the device, as the weights stay: no wait for a GPU
        mean = self.dist.reduce_mean(counts.sum()) if many else counts.sum()
        weights = torch.where(mean > 0, counts / mean.clamp_min(1), 1.0 / len(batches))
        return list(weights.unbind())

    # ------------------------------------------------------------------ one step
    def train_step(self, batches: list[dict]) -> tuple[float, dict]:
        """Forward/backward over the micro-batches; returns (loss, metrics) without stepping the optimiser."""
        if self.pipelined:
            with self._autocast():
                loss = float(self.dist.pipeline_step(self.model, batches, self.cfg.z_loss))
            self.dist.sync_grads(self.model)
            return loss, {}
        weights = self._weights(batches)
        total = torch.zeros((), device=self.device)
        agg: dict[str, float] = {}
        for i, (b, w) in enumerate(zip(batches, weights)):
            last = i == len(batches) - 1
            sync = self.dist.no_sync(self.model) if (self.dist is not None and not last and hasattr(self.dist, "no_sync")) \
                else contextlib.nullcontext()
            with sync:
                with self._autocast():
                    loss, metrics = self.loss_fn(self.model, b)
                scaled = loss * w
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            total += loss.detach() * w
            for k, v in (metrics or {}).items():  # tensors stay on the device until logged
                agg[k] = agg.get(k, 0.0) + (v.detach() if torch.is_tensor(v) else v) * w
        if self.dist is not None and hasattr(self.dist, "sync_grads"):  # (tensor parallelism's partial gradients)
            self.dist.sync_grads(self.model)
        if self.dist is not None and hasattr(self.dist, "reduce_mean"):
            total = self.dist.reduce_mean(total)
        return float(total), agg

    def _clip(self) -> float:
        """Global-norm clipping (survey §4.3): returns the norm before clipping. Float32 CPU gradients take one
        native pass for the norm (torch's clip_grad_norm_ runs a reduction per tensor at about a third of the
        memory speed), are left alone when no clipping is needed (torch multiplies them by 1.0), and with the
        fused AdamW the factor is applied inside the optimizer's own pass (its grad_scale divides by
        norm / max_norm, where torch multiplies by max_norm / norm: equal to rounding) instead of a pass of
        its own. Elsewhere: torch.nn.utils.clip_grad_norm_ (and the distributed strategies' own)."""
        self._grad_scale = None
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        if self.dist is not None and hasattr(self.dist, "clip_grad_norm"):
            return float(self.dist.clip_grad_norm(self.params, max_norm))
        grads = [p.grad for p in self.params if p.grad is not None]
        ext = fused_f32(*grads) if grads and self.scaler is None else None
        if ext is None:
            return float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        norm = ext.global_norm(grads)
        coef = max_norm / (norm + 1e-6)  # torch's formula; NaN / inf norms give NaN / 0 like torch
        if not coef >= 1.0:
            if isinstance(self.optimizer, torch.optim.AdamW) and self.optimizer.defaults.get("fused"):
                self._grad_scale = torch.tensor((norm + 1e-6) / max_norm, dtype=torch.float32)
            else:
                torch._foreach_mul_(grads, coef)
        return norm

    def _apply(self) -> bool:
        """Step the optimizer; False when fp16's loss scaler skipped the step (inf/NaN gradients: the scale is
        halved and the parameters and optimizer state stay as they were)."""
        applied = True
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            applied = self.scaler.get_scale() >= scale  # update() halves the scale exactly when it skipped
        elif self._grad_scale is not None:  # the clipping factor, applied in the fused AdamW pass (`_clip`)
            self.optimizer.grad_scale = self._grad_scale
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.grad_scale
                self._grad_scale = None
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return applied

    # ------------------------------------------------------------------ fit
    def fit(self, resume: bool = True) -> dict:
        """Train to cfg.max_steps; with resume=True continue from the run's latest good checkpoint."""
        cfg = self.cfg
        self.model.train()
        if resume and self.ckpt_dir is not None and ckpt.latest_checkpoint(self.ckpt_dir) is not None:
            self.load(ckpt.latest_checkpoint(self.ckpt_dir))
            self.logger.truncate(self.step)
        elif cfg.spike_detection and self.ckpt_dir is not None:
            self.save()  # a good state to roll back to before the first periodic checkpoint
        self._it = iter(self.train_data)
        bar = Progress(cfg.max_steps, self.step, enabled=cfg.progress and self.is_main)
        t_start, t_log, tok_log, step_log = time.perf_counter() - self.wall_offset, time.perf_counter(), 0, self.step
        flops_log = 0.0
        last = {}
        while self.step < cfg.max_steps:
            lr = self.set_lr(self.step)
            batches = self._next_batches(self.step)
            loss, metrics = self.train_step(batches)
            grad_norm = self._clip()
            bad = self.detector.check(loss) if cfg.spike_detection else None
            if bad is None and cfg.spike_detection and not math.isfinite(grad_norm) and self.scaler is None:
                bad = "nan_grad"
            if bad is not None:
                self._rollback(self.step, bad, loss)
                t_log, tok_log, flops_log, step_log = time.perf_counter(), 0, 0.0, self.step
                continue
            applied = self._apply()
            self.detector.update(loss)
            ntok = sum(int(b["input_ids"].numel()) for b in batches) * self.dp_world
            self.tokens_seen += ntok
            tok_log += ntok
            flops_log += self._flops(batches) * self.dp_world
            self.step += 1
            last = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, **metrics}
            if self.scaler is not None:  # fp16: the scale after this step, and whether the update was skipped
                last.update(loss_scale=self.scaler.get_scale(), skipped=not applied)
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                now = time.perf_counter()
                tps = tok_log / max(now - t_log, 1e-9)
                rec = {**_floats(last), "tokens": self.tokens_seen, "tokens_per_s": tps,
                       "mfu": self.mfu(flops_log / max(now - t_log, 1e-9)), "wall_time": now - t_start}
                self.logger.log(rec)
                bar.update(self.step - step_log, loss=loss, tok_s=f"{tps:,.0f}", mfu=f"{100 * rec['mfu']:.1f}%")
                t_log, tok_log, flops_log, step_log = now, 0, 0.0, self.step
                for h in self.hooks:
                    h(self, rec)
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                self._eval_and_log(t_start)
            if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step < cfg.max_steps:
                self.wall_offset = time.perf_counter() - t_start
                self.save()
        bar.close()
        final = _floats(last)
        if self.val_data is not None:
            final["val_loss"] = self._eval_and_log(t_start)
        self.wall_offset = time.perf_counter() - t_start
        if self.ckpt_dir is not None:
            self.save()
        self.logger.close()
        return final

    # ------------------------------------------------------------------ stability
    def _rollback(self, step: int, reason: str, loss: float) -> None:
        """Restore the last good checkpoint and skip the data of steps [step - w, step] (E4)."""
        self.optimizer.zero_grad(set_to_none=True)
        self._grad_scale = None
        if self.ckpt_dir is None:
            raise RuntimeError(f"loss {reason} at step {step} ({loss}) and no out_dir to roll back to")
        self.rollbacks += 1
        if self.rollbacks > self.cfg.max_rollbacks:
            raise RollbackLimit(f"{self.rollbacks} roll-backs (last: {reason} at step {step}); lower the lr, "
                                f"raise train.spike_zscore or inspect the data")
        good = ckpt.latest_checkpoint(self.ckpt_dir)
        if good is None:
            raise RuntimeError(f"loss {reason} at step {step} and no checkpoint in {self.ckpt_dir}")
        rollbacks, history = self.rollbacks, self.history
        self.load(good)
        self.rollbacks, self.history = rollbacks, history
        window = [max(self.step, step - self.cfg.spike_skip_window), step]
        self.skip_windows.append(window)
        event = {"step": step, "event": "rollback", "reason": reason, "loss": loss if math.isfinite(loss) else str(loss),
                 "restored_step": self.step, "skipped_steps": window[:2]}
        self.history.append(event)
        self.logger.truncate(self.step)
        self.logger.log(event)
        self._it = iter(self.train_data)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, n_batches: int | None = None) -> float:
        """The loss over the target tokens of the first `n_batches` validation batches (the same batches at every
        call), on every data-parallel rank."""
        if self.val_data is None:
            raise ValueError("evaluate() needs val_data")
        if self._val_state is not None:
            self.val_data.load_state_dict(self._val_state)
        rng = torch.get_rng_state()  # evaluation must not change the training random stream
        self.model.eval()
        # the loss over all target tokens of the batches (on every data-parallel rank): batches with unevenly masked
        # labels weigh by their targets, as in a training step
        num, den, it = torch.zeros((), device=self.device), torch.zeros((), device=self.device), iter(self.val_data)
        for _ in range(n_batches or self.cfg.eval_batches):
            try:
                b = self._to_device(next(it))
            except StopIteration:
                break
            with self._autocast():
                if self.pipelined:  # (this pipeline's loss: the ranks' are combined below)
                    loss = self.dist.pipeline_eval(self.model, b, self.cfg.z_loss, dp_mean=False)
                else:
                    loss, _ = self.loss_fn(self.model, b)
            n = (b["labels"] != IGNORE).sum().float() if "labels" in b else torch.ones((), device=self.device)
            num, den = num + loss.detach().float() * n, den + n
        self.model.train()
        torch.set_rng_state(rng)
        both = torch.stack([num, den])
        if self.dist is not None and hasattr(self.dist, "reduce_mean"):
            both = self.dist.reduce_mean(both)
        return float(both[0] / both[1].clamp_min(1))

    def _eval_and_log(self, t_start: float) -> float:
        val = self.evaluate()
        rec = {"step": self.step, "val_loss": val, "wall_time": time.perf_counter() - t_start}
        if self.cfg.sample_every and self.tokenizer is not None and self.is_main and not self.pipelined:
            from .data import sample_text

            rec["sample"] = sample_text(self.raw_model, self.tokenizer, self.cfg.sample_prompt, self.cfg.sample_tokens,
                                        seed=self.cfg.seed + self.step, device=self.device)
        self.logger.log(rec)
        if "sample" in rec:
            print(f"\n[step {self.step}] val_loss {val:.4f} sample:\n{rec['sample']}\n", flush=True)
        return val

    def _flops(self, batches: list[dict]) -> float:
        """Training FLOPs of this rank's micro-batches (`metrics.batch_flops`: their real decoder and encoder
        lengths), 0 without an llmkit model config."""
        if self.model_config is None or not hasattr(self.model_config, "num_params"):
            return 0.0
        return sum(batch_flops(self.model_config, b) for b in batches)

    def mfu(self, flops_per_s: float) -> float:
        """Model FLOPs utilisation: the run's training FLOP/s over the measured matmul peak of all its devices (0
        when `_flops` counts none: no llmkit model config)."""
        if not flops_per_s:
            return 0.0
        if self._peak is None:
            self._peak = measured_peak_flops(self.cfg.dtype, str(self.device))
        return flops_per_s / (self._peak * self.world)

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "wall_time": self.wall_offset,
                "data": self.train_data.state_dict() if hasattr(self.train_data, "state_dict") else None,
                "detector": self.detector.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "rollbacks": self.rollbacks, "history": self.history, "train_config": self.cfg.to_dict()}

    def save(self) -> Path | None:
        if self.ckpt_dir is None:
            return None
        getter = getattr(self.dist, "model_state_dict", None)
        model_state = getter(self.raw_model) if getter else self.raw_model.state_dict()
        opt_getter = getattr(self.dist, "optimizer_state_dict", None)  # FSDP2/TP: gathered from the shards
        opt_state = opt_getter(self.raw_model, self.optimizer) if opt_getter else self.optimizer.state_dict()
        path = None
        if self.is_main:
            path = ckpt.save_checkpoint(self.ckpt_dir, self.step, model_state=model_state, optimizer=opt_state,
                                        trainer_state=self.state(), model_config=self.model_config,
                                        tokenizer=self.tokenizer, extra_config=self._config_dict(),
                                        keep_last=self.cfg.keep_last)
        if self.dist is not None and hasattr(self.dist, "barrier"):
            self.dist.barrier()
        return path

    def load(self, path: Path) -> None:
        """Restore model, optimiser, RNG, data position and trainer state from a checkpoint directory."""
        state = ckpt.load_checkpoint(path, self.device)
        setter = getattr(self.dist, "load_model_state_dict", None)
        if setter:
            setter(self.raw_model, state["model"])
        else:
            self.raw_model.load_state_dict(state["model"], strict=True)
        opt_setter = getattr(self.dist, "load_optimizer_state_dict", None)
        if opt_setter:
            opt_setter(self.raw_model, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        ts = state["trainer_state"]
        ckpt.set_rng_state(state["rng"], ts["rng"])
        self.step, self.tokens_seen, self.wall_offset = ts["step"], ts["tokens_seen"], ts.get("wall_time", 0.0)
        if ts.get("data") is not None and hasattr(self.train_data, "load_state_dict"):
            self.train_data.load_state_dict(ts["data"])
        self.detector.load_state_dict(ts["detector"])
        if self.scaler is not None and ts.get("scaler"):
            self.scaler.load_state_dict(ts["scaler"])
        self.rollbacks, self.history = ts.get("rollbacks", 0), ts.get("history", [])
