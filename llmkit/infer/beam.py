"""Beam search of survey §4.2.4 (checklist C13), with length penalty and n-gram blocking.

Implements `beam_search(model, prompt_ids, cfg, eos_ids) -> (tokens, score)` for one prompt, following
transformers' beam search step for step so that the two agree token for token:
- per step, log-softmax of the logits, then the history processors (repetition penalty, n-gram
  blocking) on those log-probs; candidates are the top max(2, 1 + #eos) * num_beams continuations;
- a candidate among the top num_beams that ends in EOS (or reaches max_new_tokens) becomes a finished
  hypothesis scored sum_logprob / generated_len ** length_penalty; the best num_beams stay;
- the num_beams best unfinished candidates continue (the KV cache rows are reordered, not recomputed);
- early_stopping=True ends once num_beams hypotheses are finished; False ends when the best running
  beam, at its current length, can no longer beat the worst finished one (transformers' heuristic).
The cache is filled once for the prompt and then copied to the num_beams rows.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .engine import Batch
from .sampling import GenerationConfig, apply_penalties

NEG = -1.0e9  # transformers' "impossible" score; finite so that arithmetic on it stays finite


@torch.inference_mode()
def beam_search(model, prompt: Sequence[int], cfg: GenerationConfig, eos_ids: Sequence[int] = ()) -> tuple[list[int], float]:
    """The best hypothesis (generated tokens, EOS included when it ended there) and its score."""
    k, lp = cfg.num_beams, cfg.length_penalty
    if cfg.max_new_tokens == 0:
        return [], 0.0
    eos = torch.tensor(sorted(set(eos_ids)) or [-1], device=model.device)
    n_cand = max(2, 1 + len(set(eos_ids))) * k
    batch = Batch(model, [list(prompt)], cfg.max_new_tokens)
    logits = batch.prefill()
    batch.keep([0] * k)
    logits = logits.expand(k, -1)
    seqs = torch.zeros(k, 0, dtype=torch.long, device=model.device)
    run_scores = torch.full((k,), NEG, device=model.device)
    run_scores[0] = 0.0
    finished: list[tuple[float, list[int]]] = []
    improvable = True
    for step in range(cfg.max_new_tokens):
        logp = apply_penalties(logits.float().log_softmax(-1), cfg, batch.history())
        V = logp.shape[-1]
        top, idx = torch.topk((logp + run_scores[:, None]).view(-1), min(n_cand, logp.numel()))
        beam, tok = idx // V, idx % V
        last = step == cfg.max_new_tokens - 1
        hits = torch.ones_like(tok, dtype=torch.bool) if last else torch.isin(tok, eos)
        all_full = len(finished) == k
        if improvable and not (all_full and cfg.early_stopping):
            for j in torch.nonzero(hits[:k]).flatten().tolist():
                seq = seqs[beam[j]].tolist() + [int(tok[j])]
                finished.append((float(top[j]) / (step + 1) ** lp, seq))
            finished = sorted(finished, key=lambda f: -f[0])[:k]
        running = top + hits.float() * NEG
        order = torch.topk(running, k).indices
        run_scores = running[order]
        seqs = torch.cat([seqs[beam[order]], tok[order, None]], 1)
        if len(finished) == k:
            best_possible = float(run_scores[0]) / (step + 1) ** lp
            improvable = improvable and best_possible > finished[-1][0]
        if last or bool(hits.all()) or not improvable or (len(finished) == k and cfg.early_stopping):
            break
        batch.keep(beam[order].tolist())
        logits = batch.step(tok[order])
    score, best = finished[0]
    return best, score
