"""Pre-training objectives of survey §4.2.3 (D1): language modelling, prefix LM, and the loss they share.

A batch is a dict of tensors. Conventions every objective and collator in llmkit follows:
- `input_ids` [B, T]; `labels` [B, T] are the *targets of each position*, already shifted
  (labels[b, t] is the token that should follow input_ids[b, :t+1]); -100 = no loss there;
- optional `positions` [B, T], `attn_mask` ([B, T] key validity or [B, T, T] pairwise), `doc_ids` [B, T]
  (document index per token in a packed row, as `llmkit.data.shards.BatchLoader(doc_info=True)` yields:
  turned into a block-diagonal mask, i.e. document-aware masking),
  `prefix_len` [B] (bidirectional prefix, prefix LM), `block_positions` [B, T] (GLM's intra-span positions),
  `encoder_input_ids` / `encoder_attn_mask`
  (encoder-decoder: the decoder reads `input_ids`).

Implements:
- `lm_loss(model, batch, z_loss=0)`: shifted cross-entropy over the valid targets plus the PaLM
  z-loss (coef * log(Z)^2) and the MoE auxiliary loss; returns (loss, metrics). It serves causal LM,
  prefix LM, span corruption, UL2 and GLM alike, since they differ only in how the batch is built. An llmkit
  `Transformer`, wrapped or not, computes it in its forward with the output projection fused (`fused_loss`);
- `document_mask(input_ids, eos_id)`: document-aware masking for packed sequences (each token
  attends within its own document; positions restart at every document) [Llama 3, §3.2];
- `prefix_lm_batch(tokens, prefix_len)`: the prefix-LM view of a sequence (no loss on the prefix);
- `make_loss_fn(name)`: the loss function for a recipe's `objective`.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

IGNORE = -100
OBJECTIVES = ("causal_lm", "prefix_lm", "span_corruption", "ul2", "glm")
MODEL_KEYS = ("positions", "attn_mask", "prefix_len", "block_positions", "encoder_input_ids", "encoder_attn_mask")


def model_inputs(batch: dict) -> dict:
    """The optional model inputs a batch carries, besides `input_ids` (packed `doc_ids` become a block-diagonal
    `attn_mask`: each token attends only within its own document)."""
    kw = {k: batch[k] for k in MODEL_KEYS if batch.get(k) is not None}
    if "doc_ids" in batch and "attn_mask" not in kw:
        d = batch["doc_ids"]
        kw["attn_mask"] = d[:, :, None] == d[:, None, :]
    return kw


def forward(model, batch: dict, **extra) -> torch.Tensor:
    """Run the model on a batch, passing only the optional inputs the batch carries."""
    return model(batch["input_ids"], **model_inputs(batch), **extra)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, z_loss: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Mean CE over labels != -100, in float32; optional z-loss = coef * mean(logsumexp(logits)^2) (PaLM)."""
    flat = logits.reshape(-1, logits.size(-1)).float()
    lab = labels.reshape(-1)
    ce = F.cross_entropy(flat, lab, ignore_index=IGNORE)
    metrics = {"ce": ce.detach()}
    if z_loss:
        valid = lab != IGNORE
        lse = torch.logsumexp(flat[valid], dim=-1)
        zl = z_loss * lse.pow(2).mean()
        metrics["z_loss"] = zl.detach()
        return ce + zl, metrics
    return ce, metrics


def transformer_of(model):
    """The llmkit `Transformer` inside `model` (itself, or wrapped by torch.compile and/or DDP; FSDP2 keeps the
    module, as a subclass), else None."""
    from ..model.transformer import Transformer

    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    model = getattr(model, "module", model)  # DDP's
    return model if isinstance(model, Transformer) else None


def lm_loss(model, batch: dict, z_loss: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Language-modelling loss for any batch that follows the conventions above.

    An llmkit `Transformer` (also under DDP, FSDP2 or torch.compile) computes it inside its forward
    (`Transformer.loss`: the output projection fused with the loss, never materialising the logits, when the
    head allows); any other model returns logits and gets `cross_entropy`."""
    core = transformer_of(model)
    if core is not None and core.final_stage:
        loss, metrics = forward(model, batch, labels=batch["labels"], z_loss=z_loss)
    else:
        loss, metrics = cross_entropy(forward(model, batch), batch["labels"], z_loss)
    inner = core if core is not None else model  # (DDP does not forward attributes)
    aux = getattr(inner, "aux_loss", None)
    if callable(aux) and getattr(getattr(inner, "cfg", None), "n_experts", 0):
        a = aux()
        metrics["moe_aux"] = a.detach()
        loss = loss + a
    return loss, metrics


def make_loss_fn(objective: str = "causal_lm", z_loss: float = 0.0):
    """Every pre-training objective uses `lm_loss`; the objective lives in how its batches are built."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {list(OBJECTIVES)}")
    return partial(lm_loss, z_loss=z_loss)


# ---------------------------------------------------------------------------------------------- causal LM
def document_mask(input_ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(attn_mask [B, T, T], positions [B, T]) so that packed documents never attend to each other.

    A document ends with its EOS token (the EOS belongs to the document it closes).
    """
    B, T = input_ids.shape
    is_eos = (input_ids == eos_id).long()
    doc = torch.cumsum(is_eos, dim=1) - is_eos  # document index of every token
    same = doc[:, :, None] == doc[:, None, :]
    starts = torch.zeros_like(doc)
    idx = torch.arange(T, device=input_ids.device).expand(B, T)
    first = torch.where(torch.cat([torch.ones_like(doc[:, :1]), doc[:, 1:] != doc[:, :-1]], 1).bool(), idx, starts)
    positions = idx - torch.cummax(first, dim=1).values
    return same, positions


def with_document_mask(batch: dict, eos_id: int) -> dict:
    mask, pos = document_mask(batch["input_ids"], eos_id)
    return {**batch, "attn_mask": mask, "positions": pos}


# ---------------------------------------------------------------------------------------------- prefix LM
def prefix_lm_batch(tokens: torch.Tensor, prefix_len: torch.Tensor | int) -> dict:
    """Prefix LM on sequences `tokens` [B, T+1]: the first `prefix_len` inputs attend bidirectionally, and
    only the tokens after the prefix are targets (no loss on the prefix) [UniLM, U-PaLM]."""
    x, y = tokens[:, :-1], tokens[:, 1:].clone()
    B, T = x.shape
    p = torch.full((B,), prefix_len, dtype=torch.long) if isinstance(prefix_len, int) else prefix_len.long()
    t = torch.arange(T).expand(B, T)
    y[t + 1 < p[:, None]] = IGNORE  # the target at t is token t+1: inside the prefix -> no loss
    return {"input_ids": x, "labels": y, "prefix_len": p}
