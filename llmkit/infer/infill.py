"""Blank infilling with a GLM-trained model (Du et al. 2022; survey §4.2.3, the use of `objective: glm`).

`fill_blanks(model, ids, base)` takes a text of token ids holding [MASK] (short blank) or [gMASK] (long blank at
the end) ids, as `llmkit.train.denoising.glm_example` lays out Part A, and fills every blank in turn, greedily,
the way the model was trained on Part B: the whole text is read once with bidirectional attention (a prefix
over all of it), then each blank is generated after a [START] token until [END] (or `max_new` tokens), every
generated token at its [MASK]'s position and, for a `block_pos` model, at its place in the span (1, 2, ...).
Later blanks see the earlier ones' fillings through the KV cache, as later spans of Part B did in training.
Returns the text with the blanks replaced, and the fillings.
"""
from __future__ import annotations

import torch

from ..train.denoising import glm_ids


@torch.no_grad()
def fill_blanks(model, ids: list[int], base: int, max_new: int = 32) -> tuple[list[int], list[list[int]]]:
    mask_id, start_id, end_id, gmask_id = glm_ids(base)
    ids = [int(t) for t in ids]
    blanks = [i for i, t in enumerate(ids) if t in (mask_id, gmask_id)]
    if not blanks:
        return ids, []
    if model.cfg.arch == "encoder_decoder":
        raise ValueError("blank infilling takes a decoder-only model trained with objective glm")
    n = len(ids)
    if n + len(blanks) * (max_new + 1) > model.cfg.max_seq_len:
        raise ValueError(f"{n} tokens and {len(blanks)} blanks of up to {max_new} tokens exceed "
                         f"max_seq_len={model.cfg.max_seq_len}; lower max_new or shorten the text")
    was_training = model.training
    model.eval()
    dev = model.device
    block = model.cfg.block_pos
    cache = model.new_cache(1, n + len(blanks) * (max_new + 1))
    model(torch.tensor([ids], device=dev), positions=torch.arange(n, device=dev)[None], cache=cache,
          prefix_len=torch.tensor([n], device=dev),
          block_positions=torch.zeros(1, n, dtype=torch.long, device=dev) if block else None)
    fills = {}
    for pos in blanks:
        span, tok = [], start_id
        while True:
            k = len(span) + 1  # [START] is the span's place 1, its first token 2, ...
            logits = model(torch.tensor([[tok]], device=dev), positions=torch.tensor([[pos]], device=dev),
                           block_positions=torch.tensor([[k]], device=dev) if block else None, cache=cache)
            tok = int(logits[0, -1].argmax())
            if tok == end_id or len(span) == max_new:
                break
            span.append(tok)
        fills[pos] = span
    model.train(was_training)
    out = []
    for i, t in enumerate(ids):
        out.extend(fills.get(i, [t]))
    return out, list(fills.values())
