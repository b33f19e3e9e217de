"""Speculative decoding of survey §4.2.4 (checklist C13): a small draft model proposes, the target verifies.

Implements (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding";
Chen et al. 2023, "Accelerating LLM decoding with speculative sampling"):
- `accept_reject(p, q, drafts, generator)`: the verification rule. Draft token d_i ~ q_i is kept with
  probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection the token is drawn from
  norm(max(0, p_i - q_i)); when all are kept a bonus token comes from p_{n+1}. The emitted tokens are
  distributed exactly as tokens drawn from the target p one at a time. Greedy decoding is the special
  case of one-hot p and q: drafts are kept while they equal the target's argmax, so the output is the
  target's greedy output.
- `speculative_decode(target, draft, prompt, cfg, ...)`: the loop over two KV caches; the target scores
  all drafts in one forward pass of num_draft + 1 tokens, and both caches are cropped to the accepted
  prefix (`KVCache.crop`, no copy).
p and q are the *processed* distributions (temperature, top-k/p, ... of `sampling.next_token_probs`),
so the target's warped distribution is the one preserved.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

from .sampling import GenerationConfig, draw, next_token_probs

DEFAULT_NUM_DRAFT = 4  # Leviathan et al. find gamma of 3-5 best for draft/target cost ratios around 0.05-0.1


def accept_reject(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify drafts for N independent trials.

    p [N, n+1, V] target probs (the last row for the bonus token), q [N, n, V] draft probs,
    drafts [N, n] tokens drawn from q. Returns (n_accepted [N], next_token [N]).
    """
    N, n, V = q.shape
    pd = p[:, :n].gather(-1, drafts[..., None]).squeeze(-1)
    qd = q.gather(-1, drafts[..., None]).squeeze(-1)
    u = torch.rand(N, n, generator=generator, device=p.device)
    ok = u * qd < pd  # u < p/q without dividing by a q that may be 0 for greedy one-hots
    n_acc = torch.cumprod(ok.int(), 1).sum(1)
    rows = torch.arange(N, device=p.device)
    p_next = p[rows, n_acc]  # [N, V]
    q_next = torch.cat([q, torch.zeros_like(q[:, :1])], 1)[rows, n_acc]  # zero after the last draft: bonus ~ p
    resid = (p_next - q_next).clamp(min=0)
    # p == q on that row (possible only when rejection had probability 0) leaves no residual mass: use p
    empty = resid.sum(-1, keepdim=True) <= 0
    resid = torch.where(empty, p_next, resid)
    return n_acc, draw(resid / resid.sum(-1, keepdim=True), generator)


def _probs(logits: torch.Tensor, cfg: GenerationConfig, history: list[int], history_needed: bool) -> torch.Tensor:
    """Processed next-token probabilities for each row of logits [n, V], row i after history + i earlier rows."""
    if not history_needed:
        return next_token_probs(logits, cfg)
    base = len(history) - logits.shape[0] + 1
    rows = [next_token_probs(logits[i:i + 1], cfg, torch.tensor([history[:base + i]], device=logits.device))
            for i in range(logits.shape[0])]
    return torch.cat(rows)


def _forward(model, ids: list[int], cache) -> torch.Tensor:
    """Logits [T, V] for ids appended to the cache; through the fused path when the model has one."""
    x = torch.tensor([ids], device=model.device)
    fast = model.__dict__.get("fast_decoder")
    if fast is None:
        return model(x, cache=cache)[0]
    pos = torch.arange(cache.length, cache.length + len(ids), device=model.device)[None]
    return fast(x, positions=pos, cache=cache, last_only=False)[0]


@torch.inference_mode()
def speculative_decode(
    target,
    draft,
    prompt: Sequence[int],
    cfg: GenerationConfig,
    eos_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
    done: list[bool] | None = None,
    num_draft: int = DEFAULT_NUM_DRAFT,
    stats: dict | None = None,
) -> Iterator[int]:
    """Yield generated tokens one by one (EOS included); stops at EOS, max_new_tokens, or done[0] = True.

    Invariant at the top of the loop: `seq` holds prompt + accepted tokens; both caches hold seq[:-1].
    """
    if target.cfg.vocab_size != draft.cfg.vocab_size:
        raise ValueError(f"draft vocabulary ({draft.cfg.vocab_size}) differs from the target's "
                         f"({target.cfg.vocab_size}); the draft must share the target's tokenizer")
    from .engine import _needs_history

    done = done if done is not None else [False]
    seq, eos, hist = list(prompt), set(eos_ids), _needs_history(cfg)
    room = len(seq) + cfg.max_new_tokens + num_draft + 1
    tc, dc = target.new_cache(1, room), draft.new_cache(1, room)
    dev = target.device
    if len(seq) > 1:
        _forward(target, seq[:-1], tc)
        _forward(draft, seq[:-1], dc)
    emitted = 0
    stats = stats if stats is not None else {}
    stats.update(proposed=0, accepted=0, target_calls=0)
    while emitted < cfg.max_new_tokens:
        n = min(num_draft, cfg.max_new_tokens - emitted - 1)  # the verify pass adds one token of its own
        drafts, qs = [], []
        feed = seq[dc.length:]
        for _ in range(n):
            logits = _forward(draft, feed, dc)[-1:].to(dev)
            q = _probs(logits, cfg, seq + drafts, hist)
            d = int(draw(q, generator)[0]) if cfg.sampling else int(q.argmax())
            drafts.append(d)
            qs.append(q)
            feed = [d]
        p = _probs(_forward(target, [seq[-1]] + drafts, tc), cfg, seq + drafts, hist)  # [n+1, V]
        stats["target_calls"] += 1
        stats["proposed"] += n
        if not cfg.sampling:  # greedy: keep drafts while they are the target's argmax, then take the target's
            best = p.argmax(-1).tolist()
            n_acc = next((i for i, d in enumerate(drafts) if d != best[i]), n)
            nxt = best[n_acc]
        elif n:
            q = torch.cat(qs)[None]
            n_acc, nxt = accept_reject(p[None], q, torch.tensor([drafts], device=dev), generator)
            n_acc, nxt = int(n_acc[0]), int(nxt[0])
        else:
            n_acc, nxt = 0, int(draw(p[:1], generator)[0])
        stats["accepted"] += n_acc
        new = drafts[:n_acc] + [nxt]
        for t in new:
            seq.append(t)
            emitted += 1
            yield t
            if t in eos or done[0] or emitted >= cfg.max_new_tokens:
                return
        tc.crop(len(seq) - 1)
        dc.crop(len(seq) - 1)
