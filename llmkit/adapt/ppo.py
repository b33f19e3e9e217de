"""RLHF step 3: PPO (survey §5.2.3) as a rollout data source plus a loss for the one trainer.

Implements (following InstructGPT [Ouyang et al. 2022] and TRL's PPOTrainer v0.11 equations):
- `kl_rewards`: per-token reward -beta * (log pi - log pi_ref) with the sequence score added on the last
  response token; `kl_estimate` (k1 and the non-negative k3 estimator [Schulman 2020]);
- `gae`: generalised advantage estimation, A_t = sum_l (gamma*lam)^l delta_{t+l} [Schulman et al. 2016];
- `whiten`: masked standardisation (mean 0, std 1); `AdaptiveKL`: the KL controller of [Ziegler et al. 2019];
- `clipped_policy_loss` and `clipped_value_loss` (PPO [Schulman et al. 2017]);
- `ActorCritic`: the policy Transformer plus a scalar value head on its hidden states;
- `PPORollouts`: an iterable the trainer draws batches from: it samples responses with the current policy,
  scores them, computes KL-penalised rewards and GAE once, and yields minibatches for `ppo_epochs` epochs;
- `PPOObjective`: loss = clipped surrogate + vf_coef * clipped value loss (+ ptx_coef * LM loss for PPO-ptx).
"""
from __future__ import annotations

import contextlib
import random

import torch
from torch import nn

from .logprobs import lm_loss
from .peft import lora_disabled, lora_modules
from .rollout import Rollout, SeededRollouts, completion_logps, sample


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1) if dim is not None else (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask) * mask.sum() / (mask.sum() - 1).clamp(min=1)  # unbiased, as TRL
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def kl_estimate(logps, ref_logps, kind: str = "k1") -> torch.Tensor:
    d = logps - ref_logps
    if kind == "k1":
        return d
    if kind == "k3":  # (r - 1) - log r with r = pi_ref/pi: unbiased and never negative
        return torch.exp(-d) - 1 + d
    raise ValueError(f"unknown KL estimator {kind!r}; choose k1 or k3")


def kl_rewards(scores: torch.Tensor, logps, ref_logps, mask, beta: float, kind: str = "k1") -> torch.Tensor:
    """[B, C] rewards: -beta * KL per token, plus the score on each row's last response token."""
    r = -beta * kl_estimate(logps, ref_logps, kind) * mask
    last = (mask.long() * torch.arange(mask.shape[1], device=mask.device)).argmax(-1)
    r[torch.arange(r.shape[0]), last] += scores
    return r


def gae(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns (advantages + values) over right-padded responses."""
    rewards, values = rewards * mask, values * mask
    adv = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], device=rewards.device)
    T = rewards.shape[1]
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = delta + gamma * lam * last
        adv[:, t] = last
    return adv * mask, (adv + values) * mask


def clipped_policy_loss(logps, old_logps, advantages, mask, clip: float = 0.2):
    ratio = torch.exp(logps - old_logps)
    loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))
    clipfrac = masked_mean(((ratio - 1).abs() > clip).float(), mask)
    return masked_mean(loss, mask), clipfrac


def clipped_value_loss(values, old_values, returns, mask, clip: float = 0.2):
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


class AdaptiveKL:
    """beta <- beta * (1 + clip((KL/target - 1), -0.2, 0.2) * n/horizon) [Ziegler et al. 2019]."""

    def __init__(self, beta: float, target: float | None = None, horizon: int = 10000):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n: int) -> float:
        if self.target:
            err = max(-0.2, min(0.2, kl / self.target - 1))
            self.beta *= 1 + err * n / self.horizon
        return self.beta


class ActorCritic(nn.Module):
    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(policy.cfg.d_model, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.cfg = policy.cfg

    def logps_values(self, r: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        logps, h = completion_logps(self.policy, r, return_hidden=True)
        return logps, self.value_head(h.float()).squeeze(-1) * r.completion_mask


def reference_logps(policy, ref_model, r: Rollout) -> torch.Tensor:
    if ref_model is not None:
        ctx, m = contextlib.nullcontext(), ref_model
    elif lora_modules(policy):
        ctx, m = lora_disabled(policy), policy
    else:
        raise ValueError("PPO needs a frozen reference: pass ref_model, or train LoRA adapters on the policy")
    with torch.no_grad(), ctx:
        return completion_logps(m, r)


class PPORollouts(SeededRollouts):
    """Infinite iterable of PPO minibatches; `score_fn(prompts, completions) -> tensor [B]` is a reward model or a
    verifiable reward. `prompts` are token-id lists or dicts with prompt_ids (passed to score_fn whole); `stats` keeps the last rollout's figures."""

    def __init__(self, model: ActorCritic, prompts: list[list[int]], score_fn, ref_model=None, *, eos_id, pad_id=0,
                 rollout_batch: int = 16, mini_batch: int = 8, ppo_epochs: int = 2, max_new_tokens: int = 16,
                 kl_coef: float = 0.05, kl_target: float | None = None, gamma: float = 1.0, lam: float = 0.95,
                 temperature: float = 1.0, ptx_batches=None, seed: int = 0):
        self.model, self.prompts, self.score_fn, self.ref = model, prompts, score_fn, ref_model
        self.eos_id, self.pad_id = eos_id, pad_id
        self.rollout_batch, self.mini_batch, self.ppo_epochs = rollout_batch, mini_batch, ppo_epochs
        self.max_new_tokens, self.gamma, self.lam, self.temperature = max_new_tokens, gamma, lam, temperature
        self.kl = AdaptiveKL(kl_coef, kl_target)
        self.ptx = iter(ptx_batches) if ptx_batches is not None else None
        self.seed, self.calls = seed, 0
        self.rng, self.gen = random.Random(seed), torch.Generator(device="cpu")
        self.stats: dict = {}

    @torch.no_grad()
    def make_batch(self) -> dict:
        self._reseed()
        items = [self.rng.choice(self.prompts) for _ in range(self.rollout_batch)]
        prompts = [p["prompt_ids"] if isinstance(p, dict) else p for p in items]
        r = sample(self.model.policy, prompts, self.max_new_tokens, self.eos_id, self.pad_id, self.temperature,
                   generator=self.gen)
        logps, values = self.model.logps_values(r)
        ref = reference_logps(self.model.policy, self.ref, r)
        scores = torch.as_tensor(self.score_fn(items, r.completions()), dtype=torch.float32)
        mask = r.completion_mask.float()
        rewards = kl_rewards(scores, logps, ref, mask, self.kl.beta)
        adv, ret = gae(rewards, values, mask, self.gamma, self.lam)
        kl = masked_mean(logps - ref, mask, 1).mean().item() * 1.0
        self.stats = {"score": scores.mean().item(), "kl": kl, "kl_coef": self.kl.beta, "resp_len": mask.sum(1).mean().item()}
        self.kl.update(kl, len(prompts))
        return {**r.to_batch(), "old_logps": logps, "old_values": values, "advantages": whiten(adv, mask),
                "returns": ret, "mask": mask}

    def __iter__(self):
        while True:
            full = self.make_batch()
            n = full["mask"].shape[0]
            for _ in range(self.ppo_epochs):
                order = torch.randperm(n, generator=self.gen)
                for i in range(0, n - self.mini_batch + 1, self.mini_batch):
                    yield self._slice(full, order[i: i + self.mini_batch])

    def _slice(self, full: dict, idx: torch.Tensor) -> dict:
        out = {k: v[idx] for k, v in full.items()}
        out["stats"] = dict(self.stats)
        if self.ptx is not None:
            out["ptx"] = next(self.ptx)
        return out


class PPOObjective:
    def __init__(self, clip: float = 0.2, vf_coef: float = 0.1, clip_value: float = 0.2, ptx_coef: float = 0.0):
        self.clip, self.vf_coef, self.clip_value, self.ptx_coef = clip, vf_coef, clip_value, ptx_coef

    def __call__(self, model: ActorCritic, batch):
        logps, values = model.logps_values(Rollout.from_batch(batch))
        m = batch["mask"]
        pg, clipfrac = clipped_policy_loss(logps, batch["old_logps"], batch["advantages"], m, self.clip)
        vf = clipped_value_loss(values, batch["old_values"], batch["returns"], m, self.clip_value)
        loss = pg + self.vf_coef * vf
        metrics = {"pg_loss": pg.item(), "vf_loss": vf.item(), "clipfrac": clipfrac.item(), **batch.get("stats", {})}
        if self.ptx_coef and "ptx" in batch:  # PPO-ptx: keep the pre-training likelihood (InstructGPT)
            ptx = lm_loss(model.policy(batch["ptx"]["input_ids"]), batch["ptx"]["labels"])
            loss = loss + self.ptx_coef * ptx
            metrics["ptx_loss"] = ptx.item()
        return loss, metrics
