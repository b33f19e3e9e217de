"""Mixture-of-experts feed-forward (survey §4.2.1: Switch Transformer, GLaM, Mixtral).

Implements a top-k router (softmax over the k chosen logits, as Mixtral), optional expert capacity
with token dropping (Switch: capacity = factor * tokens * k / experts; dropped tokens pass through the
residual only), the Switch load-balancing loss E * sum_i f_i * P_i (minimum 1.0 under uniform routing),
and expert-usage counts for logging.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import MLP


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n, self.k, self.cap = cfg.n_experts, cfg.moe_top_k, cfg.moe_capacity_factor
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(cfg) for _ in range(cfg.n_experts))
        self.aux_loss = torch.zeros(())
        self.counts = torch.zeros(cfg.n_experts, dtype=torch.long)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        n_tok = x.shape[0]
        logits = self.router(x).float()
        probs = logits.softmax(-1)
        top_logits, top_idx = logits.topk(self.k, dim=-1)
        weights = top_logits.softmax(-1).to(x.dtype)  # [N, k]
        # Switch aux loss: fraction of tokens routed (first choice) x mean router probability, times E.
        frac = F.one_hot(top_idx[:, 0], self.n).float().mean(0)
        self.aux_loss = self.n * (frac * probs.mean(0)).sum()
        out = torch.zeros_like(x)
        counts = torch.zeros(self.n, dtype=torch.long)
        capacity = None
        if self.cap is not None:
            capacity = max(1, int(self.cap * n_tok * self.k / self.n))
        for e in range(self.n):
            tok, slot = (top_idx == e).nonzero(as_tuple=True)
            if capacity is not None and tok.numel() > capacity:  # drop the overflow, first come first served
                tok, slot = tok[:capacity], slot[:capacity]
            counts[e] = tok.numel()
            if tok.numel():
                y = self.experts[e](x[tok]) * weights[tok, slot, None]
                out.index_add_(0, tok, y)
        self.counts = counts
        return out.view(shape)
