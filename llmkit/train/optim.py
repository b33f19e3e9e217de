"""Optimisers of survey §4.3.1 (E3, Table 5): AdamW with decay groups, Adafactor, Muon.

Implements:
- `param_groups`: decoupled weight decay on weight matrices only; norms, biases and (by default)
  embeddings never decay (GPT-3 / nanoGPT practice);
- AdamW is PyTorch's own `torch.optim.AdamW` (fused on CUDA, foreach elsewhere): the reference, not a copy;
- `Adafactor` [Shazeer & Stern 2018]: factored second moments (a row and a column vector for every
  matrix, so O(n+m) state for an n x m matrix), beta2_t = 1 - t^-0.8, update clipping at RMS 1,
  optional first moment and parameter-scale-relative step; the same arithmetic as
  `transformers.optimization.Adafactor` with `relative_step=False`;
- `Muon` [Keller Jordan 2024]: momentum + Newton-Schulz orthogonalisation for the hidden weight
  matrices, AdamW for everything else (embeddings, head, norms, biases), in one optimiser so that
  one state dict resumes it;
- `build_optimizer(model, cfg, params=None)`: picks one from `TrainConfig.optimizer`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig

EMBEDDING_NAMES = ("embed", "pos_embed", "enc_pos_embed", "block_pos_embed", "t5_bias", "enc_t5_bias")


def is_embedding(name: str) -> bool:
    return name.split(".")[0] in EMBEDDING_NAMES


def named_trainable(model: nn.Module, params=None) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs to optimise: all trainable ones, or the given subset (e.g. LoRA)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        return named
    wanted = {id(p) for p in params}
    sub = [(n, p) for n, p in named if id(p) in wanted]
    if len(sub) != len(wanted):
        raise ValueError("some `params` are not trainable parameters of the model; pass model parameters")
    return sub


def param_groups(named, weight_decay: float, no_decay_embeddings: bool = True) -> list[dict]:
    decay, no_decay = [], []
    for name, p in named:
        skip = p.dim() < 2 or (no_decay_embeddings and is_embedding(name))
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


# ---------------------------------------------------------------------------------------------- Adafactor
class Adafactor(torch.optim.Optimizer):
    """Adafactor with factored second moments; matches transformers' Adafactor(relative_step=False)."""

    def __init__(self, params, lr: float = 1e-3, eps=(1e-30, 1e-3), clip_threshold: float = 1.0,
                 decay_rate: float = 0.8, beta1: float | None = None, weight_decay: float = 0.0,
                 scale_parameter: bool = False):
        defaults = dict(lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate, beta1=beta1,
                        weight_decay=weight_decay, scale_parameter=scale_parameter)
        super().__init__(params, defaults)

    @staticmethod
    def _rms(t: torch.Tensor) -> torch.Tensor:
        return t.norm(2) / (t.numel() ** 0.5)

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        state["step"] = torch.zeros((), dtype=torch.float32)
        if p.dim() >= 2:  # factored: one value per row and one per column
            state["exp_avg_sq_row"] = torch.zeros(p.shape[:-1], dtype=torch.float32, device=p.device)
            state["exp_avg_sq_col"] = torch.zeros(p.shape[:-2] + p.shape[-1:], dtype=torch.float32, device=p.device)
        else:
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        if group["beta1"] is not None:
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p] or self._init_state(p, group)
                self._update(p, p.grad.float(), state, group)
        return loss

    def _update(self, p, grad, state, group) -> None:
        state["step"] += 1
        t = float(state["step"])
        pf = p.float()
        lr = group["lr"] * (max(group["eps"][1], float(self._rms(pf))) if group["scale_parameter"] else 1.0)
        beta2t = 1.0 - t ** (-group["decay_rate"])
        sq = grad * grad + group["eps"][0]
        if p.dim() >= 2:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(sq.mean(dim=-1), alpha=1 - beta2t)
            col.mul_(beta2t).add_(sq.mean(dim=-2), alpha=1 - beta2t)
            r = (row / row.mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1)
            update = r * col.unsqueeze(-2).rsqrt() * grad
        else:
            v = state["exp_avg_sq"]
            v.mul_(beta2t).add_(sq, alpha=1 - beta2t)
            update = v.rsqrt() * grad
        update.div_((self._rms(update) / group["clip_threshold"]).clamp(min=1.0))
        update.mul_(lr)
        if group["beta1"] is not None:
            m = state["exp_avg"]
            m.mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
            update = m
        if group["weight_decay"]:
            pf.add_(pf, alpha=-group["weight_decay"] * lr)
        pf.add_(-update)
        if p.dtype != torch.float32:
            p.copy_(pf)


# ---------------------------------------------------------------------------------------------- Muon
def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximate U V^T of g = U S V^T with a quintic Newton-Schulz iteration (coefficients from Keller Jordan)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16() if g.is_cuda else g.float()  # bf16 on GPU as in the reference; fp32 on CPU for exactness
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = x @ x.mT
        B = b * A + c * A @ A
        x = a * x + B @ x
    return (x.mT if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for groups with `muon=True` (2-D hidden matrices); AdamW for the other groups."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, ns_steps: int = 5,
                 adam_lr: float = 3e-4, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0):
        defaults = dict(lr=lr, momentum=momentum, ns_steps=ns_steps, betas=betas, eps=eps,
                        weight_decay=weight_decay, muon=False, adam_lr=adam_lr)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                (self._muon if group["muon"] else self._adamw)(p, group)
        return loss

    def _muon(self, p, group) -> None:
        state = self.state[p]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf, g = state["momentum_buffer"], p.grad
        buf.lerp_(g, 1 - group["momentum"])
        update = g.lerp(buf, group["momentum"])  # Nesterov
        update = newton_schulz(update, group["ns_steps"])
        update *= max(1.0, p.size(-2) / p.size(-1)) ** 0.5  # keep the update RMS independent of the shape
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(update, alpha=-group["lr"])

    def _adamw(self, p, group) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t = float(state["step"])
        b1, b2 = group["betas"]
        lr = group["lr"]
        p.mul_(1 - lr * group["weight_decay"])
        state["exp_avg"].lerp_(p.grad, 1 - b1)
        state["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - b2**t)).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - b1**t))


def muon_groups(named, cfg: TrainConfig) -> list[dict]:
    """Hidden 2-D matrices go to Muon; embeddings, the LM head, norms and biases go to AdamW."""
    hidden = [p for n, p in named if p.dim() >= 2 and not is_embedding(n) and not n.startswith("lm_head")]
    ids = {id(p) for p in hidden}
    rest = [(n, p) for n, p in named if id(p) not in ids]
    groups = [{"params": hidden, "muon": True, "lr": cfg.muon_lr, "base_lr": cfg.muon_lr,
               "weight_decay": cfg.weight_decay}]
    for g in param_groups(rest, cfg.weight_decay, cfg.no_decay_embeddings):
        groups.append({**g, "muon": False, "lr": cfg.lr, "base_lr": cfg.lr})
    return [g for g in groups if g["params"]]


def split_sharded(groups: list[dict]) -> list[dict]:
    """torch's fused and foreach kernels take one kind of tensor on one mesh per group. Tensor parallelism alone
    leaves the embeddings, norms and head as plain tensors beside the DTensor shards, and FSDP2 + TP puts the
    TP'd matrices on the 2-D (dp, tp) mesh and the rest on the dp mesh, so such a group is split by mesh (same
    hyperparameters); groups of one kind stay as they are."""
    from .distributed import by_mesh

    out = []
    for g in groups:
        parts = by_mesh(g["params"])
        out += [g] if len(parts) == 1 else [{**g, "params": ps} for ps in parts]
    return out


def build_optimizer(model: nn.Module, cfg: TrainConfig, params=None) -> torch.optim.Optimizer:
    """The optimiser named by `cfg.optimizer`; every group records its `base_lr` for the schedule."""
    named = named_trainable(model, params)
    if not named:
        raise ValueError("no trainable parameters: check requires_grad or the `params` subset")
    if cfg.optimizer == "muon":
        return Muon(muon_groups(named, cfg), lr=cfg.muon_lr, momentum=cfg.muon_momentum, betas=cfg.betas,
                    eps=cfg.eps, weight_decay=cfg.weight_decay)
    groups = split_sharded(param_groups(named, cfg.weight_decay, cfg.no_decay_embeddings))
    for g in groups:
        g["base_lr"] = cfg.lr
    if cfg.optimizer == "adafactor":
        return Adafactor(groups, lr=cfg.lr, decay_rate=cfg.adafactor_decay_rate,
                         beta1=cfg.betas[0] if cfg.betas[0] > 0 else None)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.betas[0])
    # the fused kernel (one pass over all parameters) exists for CUDA and, since torch 2.4, for CPU
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True)
