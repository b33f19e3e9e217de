"""GRPO: group-relative policy optimisation with verifiable rewards [Shao et al. 2024, DeepSeekMath].

PPO without a value model: each prompt is sampled G times and a completion's advantage is its reward
standardised within its group, A_i = (r_i - mean(r)) / (std(r) + 1e-4) (TRL's epsilon, Bessel-corrected std).
Implements:
- `group_advantages` (scale "group", "batch" or "none" as TRL's scale_rewards);
- `grpo_loss`: clipped token-level surrogate plus beta * k3-KL to the reference, aggregated per
  sequence then over the batch ("grpo"), over all tokens ("bnpo") or by a fixed length ("dr_grpo");
- `GRPORollouts`: the trainer's data source (sample G completions per prompt with the current policy,
  score them, compute advantages, old and reference log-probs); `GRPOObjective`: its loss_fn.
"""
from __future__ import annotations

import random

import torch

from .ppo import kl_estimate, reference_logps
from .rollout import Rollout, SeededRollouts, completion_logps, sample


def group_advantages(rewards: torch.Tensor, group: int, scale: str = "group") -> torch.Tensor:
    g = rewards.view(-1, group)
    adv = (g - g.mean(1, keepdim=True)).view(-1)
    if scale == "group":
        std = g.std(1, keepdim=True).expand_as(g).reshape(-1)
    elif scale == "batch":
        std = rewards.std().expand_as(rewards)
    elif scale == "none":
        return adv
    else:
        raise ValueError(f"unknown advantage scale {scale!r}; choose group, batch or none")
    return adv / (std + 1e-4)


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, beta: float = 0.04, eps_low: float = 0.2,
              eps_high: float = 0.2, loss_type: str = "grpo", max_len: int | None = None):
    ratio = torch.exp(logps - old_logps)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    kl = kl_estimate(logps, ref_logps, "k3") if beta else torch.zeros_like(logps)
    per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (per_token.shape[0] * (max_len or per_token.shape[1]))
    else:
        raise ValueError(f"unknown GRPO loss_type {loss_type!r}; choose grpo, bnpo or dr_grpo")
    mean_kl = ((kl * mask).sum() / mask.sum().clamp(min=1)).detach()
    return loss, mean_kl


class GRPORollouts(SeededRollouts):
    """Infinite iterable of GRPO batches. `reward_fn(prompts, completions) -> list[float]`."""

    def __init__(self, model, prompts: list, reward_fn, ref_model=None, *, eos_id, pad_id=0, prompts_per_step: int = 4,
                 group: int = 8, max_new_tokens: int = 16, temperature: float = 1.0, iterations: int = 1,
                 beta: float = 0.04, scale: str = "group", seed: int = 0):
        self.model, self.prompts, self.reward_fn, self.ref = model, prompts, reward_fn, ref_model
        self.eos_id, self.pad_id, self.prompts_per_step, self.group = eos_id, pad_id, prompts_per_step, group
        self.max_new_tokens, self.temperature, self.iterations = max_new_tokens, temperature, iterations
        self.beta, self.scale = beta, scale
        self.seed, self.calls = seed, 0
        self.rng, self.gen = random.Random(seed), torch.Generator(device="cpu")
        self.stats: dict = {}

    @staticmethod
    def _ids(p) -> list[int]:
        return p["prompt_ids"] if isinstance(p, dict) else p

    @torch.no_grad()
    def make_batch(self) -> dict:
        self._reseed()
        chosen = [self.rng.choice(self.prompts) for _ in range(self.prompts_per_step)]
        items = [p for p in chosen for _ in range(self.group)]
        r = sample(self.model, [self._ids(p) for p in items], self.max_new_tokens, self.eos_id, self.pad_id,
                   self.temperature, generator=self.gen)
        rewards = torch.as_tensor(self.reward_fn(items, r.completions()), dtype=torch.float32)
        batch = {**r.to_batch(), "advantages": group_advantages(rewards, self.group, self.scale)}
        if self.iterations > 1:  # several updates per rollout need the sampling policy's log-probs
            batch["old_logps"] = completion_logps(self.model, r)
        if self.beta:
            batch["ref_logps"] = reference_logps(self.model, self.ref, r)
        self.stats = {"reward": rewards.mean().item(), "reward_std": rewards.std().item(),
                      "resp_len": r.completion_mask.sum(1).float().mean().item()}
        batch["stats"] = dict(self.stats)
        return batch

    def __iter__(self):
        while True:
            batch = self.make_batch()
            for _ in range(self.iterations):
                yield batch


class GRPOObjective:
    def __init__(self, beta: float = 0.04, eps_low: float = 0.2, eps_high: float = 0.2, loss_type: str = "grpo"):
        self.beta, self.eps_low, self.eps_high, self.loss_type = beta, eps_low, eps_high, loss_type

    def __call__(self, model, batch):
        r = Rollout.from_batch(batch)
        logps = completion_logps(model, r)
        old = batch.get("old_logps", logps.detach())
        ref = batch.get("ref_logps", logps.detach())
        mask = r.completion_mask.float()
        loss, kl = grpo_loss(logps, old, ref, batch["advantages"], mask, self.beta, self.eps_low, self.eps_high,
                             self.loss_type, r.completion_ids.shape[1])
        return loss, {"kl": kl.item(), **batch.get("stats", {})}
