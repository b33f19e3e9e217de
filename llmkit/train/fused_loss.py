"""Fused output projection + cross-entropy for training (survey §4.3 efficiency; the "fused linear
cross-entropy" of Liger-Kernel / Apple's Cut Cross-Entropy, here in plain PyTorch).

The usual loss materialises the logits [N, V] (V = vocabulary), a float32 copy of them, their
log-softmax and, in the backward pass, a gradient of the same size: four passes over the largest
activation of a small model. `linear_cross_entropy(hidden, weight, labels)` instead walks over row
chunks of `hidden`; per chunk it computes the logits, their logsumexp, the loss and right away the
gradient (softmax - one_hot) / n_valid, which it turns into the chunk's rows of d loss / d hidden and
adds into d loss / d weight. Only [chunk, V] logits and probabilities are ever alive (bounded by
CHUNK_ELEMENTS), and the backward pass is a scaling of the two saved gradients. Same value and gradients as
`F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100)` (+ the PaLM z-loss) to rounding.

Under autocast the matmuls run in the autocast dtype (as `nn.Linear` would), the softmax reads them
in that dtype and sums in float32, the loss is float32, and the weight gradient is accumulated in float32.
"""
from __future__ import annotations

import torch

from ..model.layers import fused_f32
from .objectives import IGNORE
# logits per chunk (8 MiB in bf16): each chunk ends in a float32 cast and sum of the whole [V, d] weight
# gradient, so chunks are not tiny; measured at V=8192, d=384, 2048 rows, bf16, one core (bench/pretrain.py
# shapes): 256 rows 135 ms, 512 rows 104 ms, 1024 rows 110 ms, 2048 rows 128 ms (fresh 32 MiB buffers page-fault)
CHUNK_ELEMENTS = 1 << 22
# On a GPU the chunks are bounded by memory alone (512 MiB of bf16 logits): at GPT-2's V = 50304 the CPU bound
# would give 83-row chunks, each a dozen small kernel launches and a pass over the [V, d] weight gradient
CHUNK_ELEMENTS_GPU = 1 << 28


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else t.dtype


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, z_loss: float, chunk: int, need: bool):
        cdt = _compute_dtype(hidden)
        ft = torch.promote_types(cdt, torch.float32)  # softmax sums and loss: float32 (float64 stays float64)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(cdt)
            n_valid = (labels != IGNORE).sum().clamp(min=1).to(ft)
            grad_h = torch.empty_like(hidden) if need else None
            grad_w = None
            total = torch.zeros((), dtype=ft, device=hidden.device)
            lse_sq = torch.zeros((), dtype=ft, device=hidden.device)
            for s in range(0, hidden.shape[0], chunk):
                h = hidden[s:s + chunk].to(cdt)
                probs, rows, t, z = _chunk(h, w, labels[s:s + chunk], z_loss, n_valid, ft, need)
                total += t
                lse_sq += z
                if not need:
                    continue
                grad_h[s:s + chunk] = (probs @ w) * rows  # the row factors, applied to [n, d] not [n, V]
                hr = h * rows.to(cdt)
                if grad_w is None:
                    grad_w = (probs.t() @ hr).to(torch.promote_types(weight.dtype, torch.float32))
                elif grad_w.dtype == cdt:  # accumulated inside the matmul: no [V, d] temporary per chunk
                    grad_w.addmm_(probs.t(), hr)
                else:  # bf16 products summed in float32
                    grad_w.add_(probs.t() @ hr)
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


def _chunk(h, w, y, z_loss, n_valid, ft, need):
    """Loss sums of one row chunk; with `need`, also its gradient d loss / d logits as
    probs * rows with probs = softmax - one_hot / (1 + 2 z lse), rows = (1 + 2 z lse) * valid / n_valid.

    The softmax runs on the logits in the matmul dtype (one kernel, float32 inside, no float32 copy of
    the logits) and is itself the gradient buffer. Precision without the float32 logits:
    - 1 - p_target is summed from the other probabilities (not subtracted from 1), so a confident
      prediction keeps an exact-to-rounding gradient p_target - 1 and loss -log1p(-(1 - p_target));
    - the log-sum-exp (for unconfident rows and the z-loss) follows from the largest probability,
      lse = x_j - log p_j at j = argmax (p_j >= 1/V, so bf16 rounding moves it by at most 2^-9)."""
    valid = y != IGNORE
    tgt = y.clamp(min=0)
    logits = h @ w.t()
    flat = torch.arange(logits.shape[0], device=h.device) * logits.shape[1] + tgt
    ext = fused_f32(logits)
    if ext is not None:  # (a fresh matmul result: contiguous rows)
        # float32 on CPU: one native pass per row in L2 (llmkit/infer/csrc/train_ops.cpp) gives the same
        # probabilities (target entry 0), log-sum-exp, target logit and 1 - p_target
        lse, picked, other = ext.softmax_xent_(logits, tgt)
        probs = logits
    else:
        probs = torch.softmax(logits, dim=-1)
        # softmax is monotone, so the largest probability belongs to the largest logit (amax: no index pass)
        lse = logits.amax(dim=-1).to(ft) - probs.amax(dim=-1).to(ft).log()
        picked = logits.gather(1, tgt[:, None]).squeeze(1).to(ft)
        del logits
        # the target entries on the flat view (scatter_ copies the whole [n, V] tensor on CPU: 50x slower)
        probs.view(-1).index_fill_(0, flat, 0)
        # 1 - p_target; summed in float32 inside, rounded once (sum(dtype=) would first copy [n, V] to float32)
        other = probs.sum(dim=-1).to(ft)
    loss = torch.where(other < 0.5, -torch.log1p(-other.clamp(max=0.5)), lse - picked)
    total = (loss * valid).sum()
    zsum = (lse.pow(2) * valid).sum() if z_loss else torch.zeros((), dtype=ft, device=h.device)
    if not need:
        return None, None, total, zsum
    if z_loss:
        factor = 1 + 2 * z_loss * lse
        target = (1 - 1 / factor) - other  # p_target - 1 / factor
    else:
        factor, target = torch.ones_like(lse), -other
    probs.view(-1).index_copy_(0, flat, target.to(probs.dtype))
    return probs, (factor * valid / n_valid)[:, None], total, zsum


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, z_loss: float = 0.0,
                         chunk: int | None = None) -> tuple[torch.Tensor, dict]:
    """Mean CE of hidden [..., d] projected by weight [V, d] against labels [...] (-100 = ignored).

    Returns (loss, metrics) like `objectives.cross_entropy`; the gradient w.r.t. ce and z-loss is taken
    through their sum (the training loss) only.
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    lab = labels.reshape(-1)
    chunk = chunk or max(64, (CHUNK_ELEMENTS if h.device.type == "cpu" else CHUNK_ELEMENTS_GPU) // weight.shape[0])
    # gradients are computed in the forward pass, so skip them when no backward can follow (evaluation)
    need = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    loss, ce, zl = LinearCrossEntropy.apply(h, weight, lab, float(z_loss), int(chunk), need)
    metrics = {"ce": ce.detach()}
    if z_loss:
        metrics["z_loss"] = zl.detach()
    return loss, metrics
