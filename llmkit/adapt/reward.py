"""Reward modelling, RLHF step 2 (survey §5.2.2-5.2.3), and preference-data utilities.

Implements:
- `RewardModel`: a Transformer trunk plus a scalar head read at the last real token (HF's
  *ForSequenceClassification convention, which TRL's RewardTrainer uses);
- `pairwise_loss`: -log sigma(r(x,y_w) - r(x,y_l) - margin) [InstructGPT], optional reward centring
  coefficient (TRL `center_rewards_coefficient`);
- `kwise_loss`: all K(K-1)/2 pairs of a K-way ranking in one batch, averaged (InstructGPT);
  `listwise_loss`: Plackett-Luce negative log-likelihood of the full ranking;
- `ranking_pairs`, `bradley_terry` (MM fit of strengths [Hunter 2004]) and `elo` ratings;
- `RewardObjective`: the trainer's loss_fn for batches [chosen..., rejected...] with an optional
  LM-loss regulariser on the chosen responses (survey §5.2.3, effective RM training).
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from .logprobs import lm_loss


class RewardModel(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.score = nn.Linear(backbone.cfg.d_model, 1, bias=False)
        nn.init.normal_(self.score.weight, std=1 / (backbone.cfg.d_model + 1) ** 0.5)  # TRL's init of the value head
        self.cfg = backbone.cfg

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, return_lm: bool = False):
        """Scalar reward [B] at the last token with attention_mask = 1 (right padding)."""
        h = self.backbone(input_ids, return_hidden=True)
        if attention_mask is None:
            last = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
        else:
            idx = torch.arange(input_ids.shape[1], device=input_ids.device)
            last = (idx * attention_mask.long()).argmax(-1)
        r = self.score(h[torch.arange(h.shape[0], device=h.device), last]).squeeze(-1).float()
        return (r, self.backbone.project(h)) if return_lm else r


def pairwise_loss(r_chosen, r_rejected, margin=None, center_coef: float | None = None) -> torch.Tensor:
    diff = r_chosen - r_rejected - (margin if margin is not None else 0.0)
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    return loss


def ranking_pairs(k: int) -> list[tuple[int, int]]:
    """Index pairs (better, worse) of a ranking of k items, best first: k(k-1)/2 of them."""
    return list(itertools.combinations(range(k), 2))


def kwise_loss(rewards: torch.Tensor) -> torch.Tensor:
    """rewards [N, K] of K responses per prompt ranked best first; mean pairwise loss over all C(K,2) pairs."""
    i, j = zip(*ranking_pairs(rewards.shape[1]))
    return -F.logsigmoid(rewards[:, list(i)] - rewards[:, list(j)]).mean()


def listwise_loss(rewards: torch.Tensor) -> torch.Tensor:
    """Plackett-Luce NLL of the order best-first: sum_k [logsumexp(r_k..r_K) - r_k]."""
    rev_lse = torch.logcumsumexp(rewards.flip(-1), -1).flip(-1)
    return (rev_lse - rewards)[:, :-1].sum(-1).mean()


def accuracy(r_chosen, r_rejected) -> float:
    return (r_chosen > r_rejected).float().mean().item()


def bradley_terry(n_players: int, wins: list[tuple[int, int]], iters: int = 200) -> torch.Tensor:
    """Strengths p (sum 1) maximising prod p_w/(p_w+p_l) over (winner, loser) games, by Hunter's MM updates."""
    w = torch.zeros(n_players)
    games = torch.zeros(n_players, n_players)
    for a, b in wins:
        w[a] += 1
        games[a, b] += 1
        games[b, a] += 1
    p = torch.full((n_players,), 1.0 / n_players, dtype=torch.float64)
    for _ in range(iters):
        denom = (games / (p[:, None] + p[None, :])).sum(1)
        p = w.double() / denom.clamp(min=1e-12)
        p = p / p.sum()
    return p.float()


def elo(n_players: int, games: list[tuple[int, int]], k: float = 16.0, base: float = 1000.0) -> torch.Tensor:
    """Sequential Elo ratings from (winner, loser) games (logistic, 400-point scale)."""
    r = torch.full((n_players,), base)
    for a, b in games:
        expect = 1 / (1 + 10 ** ((r[b] - r[a]) / 400))
        r[a] += k * (1 - expect)
        r[b] -= k * (1 - expect)
    return r


def collate_pairs(examples: list[dict], pad_id: int, max_len: int | None = None) -> dict:
    """[{prompt_ids, chosen_ids, rejected_ids}] -> input_ids/attention_mask [2B, T], chosen rows first."""
    from .dpo import collate_preferences

    return collate_preferences(examples, pad_id, max_len)


class RewardObjective:
    """loss_fn(model: RewardModel, batch) for the trainer."""

    def __init__(self, center_coef: float | None = None, lm_coef: float = 0.0):
        self.center_coef, self.lm_coef = center_coef, lm_coef

    def __call__(self, model, batch):
        if "rewards_order" in batch:  # K-way rankings: input_ids [N*K, T] grouped per prompt, best first
            k = batch["rewards_order"]
            r = model(batch["input_ids"], batch["attention_mask"]).view(-1, k)
            return kwise_loss(r), {"acc": (r[:, :-1] > r[:, 1:]).float().mean().item()}
        want_lm = self.lm_coef > 0
        out = model(batch["input_ids"], batch["attention_mask"], return_lm=want_lm)
        r, logits = out if want_lm else (out, None)
        rc, rr = r.chunk(2)
        loss = pairwise_loss(rc, rr, batch.get("margin"), self.center_coef)
        if want_lm:  # LM regulariser on the chosen responses only
            n = rc.shape[0]
            labels = batch["input_ids"][:n].masked_fill(batch["completion_mask"][:n] == 0, -100)
            loss = loss + self.lm_coef * lm_loss(logits[:n], labels)
        return loss, {"acc": accuracy(rc, rr), "margin": (rc - rr).mean().item(), "reward_mean": r.mean().item()}
