"""Per-token log-probabilities of a response under a causal LM: the quantity every objective of survey §5.2 uses.

Implements `token_logps` (log p(target) from logits without materialising a second [B, T, V] tensor),
`response_logps` (shifted, masked per-token log-probs of the tokens flagged in a completion mask) and
`lm_loss` (mean cross-entropy over labelled tokens; label -100 = no loss, the convention of torch and HF) and
`sft_loss` (the same loss for the trainer, projecting only labelled positions to the vocabulary).
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
    """Per-token log-probs [B, T-1] of input_ids[:, 1:] and the shifted mask (1 = response token).

    The vocabulary projection runs only on the hidden states that predict response tokens (the prompt's
    logits are never needed), which is most of the LM-head cost for long prompts and large vocabularies."""
    mask = completion_mask[:, 1:].bool()
    targets = input_ids[:, 1:]
    if hasattr(model, "project"):
        h = model(input_ids, return_hidden=True, **fwd)[:, :-1]
        picked = token_logps(model.project(h[mask]), targets[mask])
        logps = torch.zeros(mask.shape, dtype=picked.dtype, device=picked.device).masked_scatter(mask, picked)
    else:  # wrappers without a separate head (prefix / prompt tuning)
        logps = token_logps(model(input_ids, **fwd)[:, :-1], targets) * mask
    return logps, mask.to(logps.dtype)


def sft_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """The trainer's LM loss (mean CE over labels != -100, block-diagonal mask for packed rows) with the head
    applied only to labelled positions: SFT prompts and system/user turns cost no vocabulary projection."""
    from ..train.objectives import MODEL_KEYS

    kw = {k: batch[k] for k in MODEL_KEYS if batch.get(k) is not None}
    if "doc_ids" in batch and "attn_mask" not in kw:
        d = batch["doc_ids"]
        kw["attn_mask"] = d[:, :, None] == d[:, None, :]
    labels = batch["labels"]
    sel = labels != IGNORE
    h = model(batch["input_ids"], return_hidden=True, **kw)
    ce = F.cross_entropy(model.project(h[sel]).float(), labels[sel])
    return ce, {"ce": ce.detach()}


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, shift: bool = True) -> torch.Tensor:
    """Mean next-token cross-entropy over labels != -100 (labels aligned with inputs when shift=True)."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE)
