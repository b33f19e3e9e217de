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


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else t.dtype


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, z_loss: float, chunk: int, need: bool):
        cdt = _compute_dtype(hidden)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(cdt)
            n_valid = (labels != IGNORE).sum().clamp(min=1).to(torch.float32)
            grad_h = torch.empty_like(hidden) if need else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            lse_sq = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for s in range(0, hidden.shape[0], chunk):
                h = hidden[s:s + chunk].to(cdt)
                y = labels[s:s + chunk]
                valid = y != IGNORE
                tgt = y.clamp(min=0)
                logits = (h @ w.t()).float()
                lse = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, tgt[:, None]).squeeze(1)
                total += ((lse - picked) * valid).sum()
                if z_loss:
                    lse_sq += (lse.pow(2) * valid).sum()
                if not need:
                    continue
                # d loss / d logits = (softmax * (1 + 2 z lse) - one_hot) * valid / n_valid, built in place
                scale = valid / n_valid
                if z_loss:
                    probs = logits.sub_(lse[:, None]).exp_().mul_((scale * (1 + 2 * z_loss * lse))[:, None])
                else:
                    probs = logits.sub_(lse[:, None]).exp_().mul_(scale[:, None])
                probs.scatter_add_(1, tgt[:, None], -scale[:, None])
                g = probs.to(cdt)
                grad_h[s:s + chunk] = (g @ w).to(hidden.dtype)
                grad_w += (g.t() @ h).float()
        ce = total / n_valid
        zl = z_loss * lse_sq / n_valid
        if need:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        ctx.mark_non_differentiable(ce, zl)
        return ce + zl, ce, zl

    @staticmethod
    def backward(ctx, g_loss, _g_ce, _g_zl):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * g_loss.to(grad_h.dtype), grad_w * g_loss.to(grad_w.dtype), None, None, None, None


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
