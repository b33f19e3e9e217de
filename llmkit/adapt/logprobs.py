"""Per-token log-probabilities of a response under a causal LM: the quantity every objective of survey §5.2 uses.

Implements `token_logps` (log p(target) from logits without materialising a second [B, T, V] tensor),
`response_logps` (shifted, masked per-token log-probs of the tokens flagged in a completion mask) and
`lm_loss` (mean cross-entropy over labelled tokens; label -100 = no loss, the convention of torch and HF).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # label of tokens that carry no loss (torch / HF convention)


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] for every position; float32 whatever the model dtype."""
    logits = logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def response_logps(model, input_ids: torch.Tensor, completion_mask: torch.Tensor, **fwd) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs [B, T-1] of input_ids[:, 1:] and the shifted mask (1 = response token)."""
    logits = model(input_ids, **fwd)
    logps = token_logps(logits[:, :-1], input_ids[:, 1:])
    mask = completion_mask[:, 1:].to(logps.dtype)
    return logps * mask, mask


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, shift: bool = True) -> torch.Tensor:
    """Mean next-token cross-entropy over labels != -100 (labels aligned with inputs when shift=True)."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE)
