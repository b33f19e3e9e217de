"""Fused output projection + cross-entropy for training (survey §4.3 efficiency; the "fused linear
cross-entropy" of Liger-Kernel / Apple's Cut Cross-Entropy, here in plain PyTorch).

The usual loss materialises the logits [N, V] (V = vocabulary), a float32 copy of them, their
log-softmax and, in the backward pass, a gradient of the same size: four passes over the largest
activation of a small model. `linear_cross_entropy(hidden, weight, labels)` instead walks over row
chunks of `hidden`; per chunk it computes the logits, their logsumexp, the loss and right away the
gradient (softmax - one_hot) / n_valid, which it turns into the chunk's rows of d loss / d hidden and
adds into d loss / d weight. Only [chunk, V] is ever alive (it stays in cache), and the backward pass
is a scaling of the two saved gradients. Same value and gradients as
`F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100)` (+ the PaLM z-loss) to rounding.

Under autocast the matmuls run in the autocast dtype (as `nn.Linear` would), softmax and loss in
float32, and the weight gradient is accumulated in float32.
"""
from __future__ import annotations

import torch

IGNORE = -100
CHUNK_ELEMENTS = 1 << 21  # logits per chunk: 8 MiB of float32, about an L2 cache's worth on a server core
# d loss / d logits rows kept for one pair of matmuls (64 MiB in bf16): the weight gradient is then summed
# once per group in float32 instead of once per chunk (a cast and an add of [V, d] each time)
GROUP_ELEMENTS = 1 << 25


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else t.dtype


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, z_loss: float, chunk: int, need: bool):
        cdt = _compute_dtype(hidden)
        ft = torch.promote_types(cdt, torch.float32)  # softmax and loss: float32 (float64 stays float64)
        N, V = hidden.shape[0], weight.shape[0]
        group = max(chunk, GROUP_ELEMENTS // V // chunk * chunk)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(cdt)
            n_valid = (labels != IGNORE).sum().clamp(min=1).to(ft)
            grad_h = torch.empty_like(hidden) if need else None
            grad_w = None
            probs = torch.empty(min(group, N), V, dtype=cdt, device=hidden.device) if need else None
            total = torch.zeros((), dtype=ft, device=hidden.device)
            lse_sq = torch.zeros((), dtype=ft, device=hidden.device)
            for g0 in range(0, N, group):
                h = hidden[g0:g0 + group].to(cdt)
                rows = torch.empty(h.shape[0], 1, dtype=ft, device=hidden.device) if need else None
                for s in range(0, h.shape[0], chunk):
                    e = min(s + chunk, h.shape[0])
                    t, z = _chunk(h[s:e], w, labels[g0 + s:g0 + e], z_loss, n_valid, ft,
                                  probs[s:e] if need else None, rows[s:e] if need else None)
                    total += t
                    lse_sq += z
                if need:
                    g = probs[: h.shape[0]]
                    grad_h[g0:g0 + group] = (g @ w) * rows  # the row factors, applied to [n, d] not [n, V]
                    gw = (g.t() @ (h * rows.to(cdt))).to(torch.promote_types(weight.dtype, torch.float32))
                    grad_w = gw if grad_w is None else grad_w.add_(gw)
        ce = (total / n_valid).float()  # the loss is reported in float32, like `objectives.cross_entropy`
        zl = (z_loss * lse_sq / n_valid).float()
        if need:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        ctx.mark_non_differentiable(ce, zl)
        return ce + zl, ce, zl

    @staticmethod
    def backward(ctx, g_loss, _g_ce, _g_zl):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * g_loss.to(grad_h.dtype), grad_w * g_loss.to(grad_w.dtype), None, None, None, None


def _chunk(h, w, y, z_loss, n_valid, ft, probs, rows):
    """Loss sums of one row chunk; with `probs` given, also its gradient d loss / d logits as
    rows * (softmax - one_hot / (1 + 2 z lse)) (rows = (1 + 2 z lse) * valid / n_valid): the softmax goes
    straight into `probs` in the matmul dtype, the one-hot entries are written from float32 values (so
    p_target - 1 keeps its precision), and the row factors are left for the [n, d]-sized products."""
    valid = y != IGNORE
    tgt = y.clamp(min=0)[:, None]
    logits = h @ w.t()
    logp = torch.log_softmax(logits, dim=-1, dtype=ft)
    picked = logp.gather(1, tgt).squeeze(1)
    total = -(picked * valid).sum()
    lse = logits.gather(1, tgt).squeeze(1).to(ft) - picked if z_loss else None  # logit_t - log p_t
    zsum = (lse.pow(2) * valid).sum() if z_loss else torch.zeros((), dtype=ft, device=h.device)
    if probs is not None:
        factor = 1 + 2 * z_loss * lse if z_loss else torch.ones_like(picked)
        torch.exp(logp, out=probs)
        probs.scatter_(1, tgt, (picked.exp() - 1 / factor)[:, None].to(probs.dtype))
        rows.copy_((factor * valid / n_valid)[:, None])
    return total, zsum


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, z_loss: float = 0.0,
                         chunk: int | None = None) -> tuple[torch.Tensor, dict]:
    """Mean CE of hidden [..., d] projected by weight [V, d] against labels [...] (-100 = ignored).

    Returns (loss, metrics) like `objectives.cross_entropy`; the gradient w.r.t. ce and z-loss is taken
    through their sum (the training loss) only.
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    lab = labels.reshape(-1)
    chunk = chunk or max(64, CHUNK_ELEMENTS // weight.shape[0])
    # gradients are computed in the forward pass, so skip them when no backward can follow (evaluation)
    need = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    loss, ce, zl = LinearCrossEntropy.apply(h, weight, lab, float(z_loss), int(chunk), need)
    metrics = {"ce": ce.detach()}
    if z_loss:
        metrics["z_loss"] = zl.detach()
    return loss, metrics
