"""Rollouts for RL fine-tuning and sampling-based refinement (survey §5.2.3 practical strategies, §5.2.4 RAFT).

Implements:
- `sample`: batched ancestral sampling with the model's KV cache (left-padded prompts, temperature,
  top-k); returns prompt and completion tensors in the layout TRL's GRPO uses
  (prompt_ids/prompt_mask left-padded, completion_ids/completion_mask right-padded, EOS included).
  It is the minimal loop over the model API; `llmkit.infer` owns the serving engine;
- `completion_logps`: per-token log-probs (and hidden states for a value head) of the completion
  tokens under a model, with the positions and padding mask of the rollout;
- `best_of_n`: n samples per prompt, keep the argmax reward; `rejection_sample`: keep those above a threshold
  (the RAFT / rejection-sampling data of survey §5.2.4).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .logprobs import token_logps


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor  # [B, P]
    completion_ids: torch.Tensor  # [B, C] right-padded, EOS kept
    completion_mask: torch.Tensor  # [B, C]

    def completions(self) -> list[list[int]]:
        return [row[m.bool()].tolist() for row, m in zip(self.completion_ids, self.completion_mask)]

    def to_batch(self) -> dict:
        """Flat tensors for the trainer (input_ids = prompt + completion, which it counts as tokens)."""
        return {"prompt_ids": self.prompt_ids, "prompt_mask": self.prompt_mask, "completion_ids": self.completion_ids,
                "completion_mask": self.completion_mask, "input_ids": torch.cat([self.prompt_ids, self.completion_ids], 1)}

    @classmethod
    def from_batch(cls, b: dict) -> "Rollout":
        return cls(b["prompt_ids"], b["prompt_mask"], b["completion_ids"], b["completion_mask"])


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, P - len(p):] = torch.tensor(p)
            mask[i, P - len(p):] = 1
    return ids, mask


def _pick(logits: torch.Tensor, temperature: float, top_k: int, gen) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(-1)


@torch.no_grad()
def sample(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int | list[int] | None, pad_id: int = 0,
           temperature: float = 1.0, top_k: int = 0, generator: torch.Generator | None = None) -> Rollout:
    was_training = model.training
    model.eval()
    dev = model.device
    ids, mask = left_pad(prompts, pad_id)
    ids, mask = ids.to(dev), mask.to(dev)
    B, P = ids.shape
    eos = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id or []), device=dev)
    cache = model.new_cache(B, P + max_new_tokens)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(ids, positions=pos, attn_mask=mask.bool(), cache=cache)[:, -1]
    next_pos = pos[:, -1:] + 1
    key_mask = mask.bool()
    out, done = [], torch.zeros(B, dtype=torch.bool, device=dev)
    for _ in range(max_new_tokens):
        tok = _pick(logits, temperature, top_k, generator)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        out.append(torch.stack([tok, (~done).long()], -1))
        done = done | torch.isin(tok, eos)
        if bool(done.all()):
            break
        key_mask = torch.cat([key_mask, torch.ones(B, 1, dtype=torch.bool, device=dev)], 1)
        logits = model(tok[:, None], positions=next_pos, attn_mask=key_mask, cache=cache)[:, -1]
        next_pos = next_pos + 1
    model.train(was_training)
    seq = torch.stack(out, 1)
    return Rollout(ids, mask, seq[..., 0], seq[..., 1])


def completion_logps(model, r: Rollout, return_hidden: bool = False):
    """log p(completion token t) [B, C] (masked to 0 outside the completion) and, optionally, the hidden
    state that predicts each completion token [B, C, d] (the value head's input)."""
    ids = torch.cat([r.prompt_ids, r.completion_ids], 1)
    mask = torch.cat([r.prompt_mask, r.completion_mask], 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    P, C = r.prompt_ids.shape[1], r.completion_ids.shape[1]
    h = model(ids, positions=pos, attn_mask=mask.bool(), return_hidden=True)[:, P - 1: P + C - 1]
    logps = token_logps(model.project(h), r.completion_ids) * r.completion_mask
    return (logps, h) if return_hidden else logps


def best_of_n(model, prompt: list[int], n: int, reward_fn, max_new_tokens: int, eos_id, pad_id: int = 0,
              temperature: float = 1.0, generator=None) -> tuple[list[int], float, list[float]]:
    """Draw n completions of one prompt and return (best completion, its reward, all rewards)."""
    r = sample(model, [prompt] * n, max_new_tokens, eos_id, pad_id, temperature, generator=generator)
    comps = r.completions()
    rewards = [float(x) for x in reward_fn([prompt] * n, comps)]
    best = max(range(n), key=rewards.__getitem__)
    return comps[best], rewards[best], rewards


def rejection_sample(model, prompts: list[list[int]], n: int, reward_fn, threshold: float, max_new_tokens: int,
                     eos_id, pad_id: int = 0, temperature: float = 1.0, generator=None) -> list[dict]:
    """Keep, per prompt, the best of n completions when its reward reaches `threshold` (RAFT's filter)."""
    kept = []
    for p in prompts:
        comp, rew, _ = best_of_n(model, p, n, reward_fn, max_new_tokens, eos_id, pad_id, temperature, generator)
        if rew >= threshold:
            kept.append({"prompt_ids": p, "completion_ids": comp, "reward": rew})
    return kept


class SeededRollouts:
    """Base of the PPO/GRPO rollout sources (the Trainer's data): state is the call count, and every call
    re-seeds its own RNGs from (seed, calls), so a resumed run draws the same prompts and samples.
    Subclasses set `seed`, `calls`, `rng` and `gen` (a torch.Generator)."""

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, s: dict) -> None:
        self.calls = s["calls"]

    def _reseed(self) -> None:
        self.rng = random.Random(self.seed * 1_000_003 + self.calls)
        self.gen.manual_seed(self.seed * 1_000_003 + self.calls)
        self.calls += 1
