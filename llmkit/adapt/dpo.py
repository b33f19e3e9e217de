"""Alignment without RL (survey §5.2.4): DPO, IPO and KTO with a frozen reference policy.

Implements:
- `dpo_loss`: -log sigma(beta * [(log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))])
  [Rafailov et al. 2023] over summed response log-probs; "hinge" (SLiC) and "ipo" [Azar et al. 2023],
  IPO length-normalised per response token as TRL does (confirmed with the IPO authors, see TRL);
- `kto_loss`: KTO [Ethayarajh et al. 2024] on unpaired desirable/undesirable responses with the batch
  KL estimate z0 = max(0, mean log pi/pi_ref over mismatched prompt-response pairs);
- `collate_preferences`: prompt/chosen/rejected token ids -> one right-padded batch [chosen..., rejected...]
  (the layout of TRL's DataCollatorForPreference);
- `collate_shared_prompt`: one row per pair, [prompt | chosen | rejected], the rejected tokens placed at the
  chosen ones' positions and masked from seeing the chosen ones, so the prompt runs once per pair (policy and
  reference) while every log-prob, and every gradient through the prompt's keys and values, equals the
  two-row layout's;
- `DPOObjective`: the trainer's `loss_fn(model, batch) -> (loss, metrics)` over either layout; the reference is
  a frozen copy, or, when the policy carries LoRA adapters and no reference is given, the same model with
  adapters off, run under inference mode.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from .logprobs import response_logps, token_logps
from .peft import lora_disabled, lora_modules


def dpo_loss(pol_chosen, pol_rejected, ref_chosen, ref_rejected, beta: float = 0.1, loss_type: str = "sigmoid",
             chosen_len=None, rejected_len=None, label_smoothing: float = 0.0):
    """Per-pair losses and the implicit rewards beta*log(pi/pi_ref) of chosen and rejected."""
    chosen_lr, rejected_lr = pol_chosen - ref_chosen, pol_rejected - ref_rejected
    delta = chosen_lr - rejected_lr
    if loss_type == "sigmoid":  # label smoothing = conservative DPO (cDPO)
        loss = -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing
    elif loss_type == "hinge":
        loss = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        if chosen_len is None or rejected_len is None:
            raise ValueError("IPO normalises by response length: pass chosen_len and rejected_len")
        d = chosen_lr / chosen_len.clamp(min=1) - rejected_lr / rejected_len.clamp(min=1)
        loss = (d - 1 / (2 * beta)) ** 2  # IPO eq. 17, beta plays tau
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose sigmoid, hinge or ipo")
    return loss, beta * chosen_lr.detach(), beta * rejected_lr.detach()


def kto_loss(pol_logps, ref_logps, desirable, pol_kl_logps, ref_kl_logps, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """KTO per-example losses; `desirable` bool [B]; *_kl_logps are log-probs of mismatched (x, y') pairs."""
    z0 = (pol_kl_logps - ref_kl_logps).mean().clamp(min=0).detach()
    lr = pol_logps - ref_logps
    good = 1 - torch.sigmoid(beta * (lr - z0))
    bad = 1 - torch.sigmoid(beta * (z0 - lr))
    loss = torch.where(desirable, desirable_weight * good, undesirable_weight * bad)
    return loss, z0


def collate_preferences(examples: list[dict], pad_id: int, max_len: int | None = None) -> dict:
    """[{prompt_ids, chosen_ids, rejected_ids}] -> input_ids [2B, T] (chosen rows first) + completion_mask."""
    rows, masks = [], []
    for key in ("chosen_ids", "rejected_ids"):
        for ex in examples:
            ids = list(ex["prompt_ids"]) + list(ex[key])
            m = [0] * len(ex["prompt_ids"]) + [1] * len(ex[key])
            rows.append(ids[:max_len] if max_len else ids)
            masks.append(m[:max_len] if max_len else m)
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((len(rows), T), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (r, m) in enumerate(zip(rows, masks)):
        input_ids[i, : len(r)] = torch.tensor(r)
        completion_mask[i, : len(m)] = torch.tensor(m)
        attention_mask[i, : len(r)] = 1
    return {"input_ids": input_ids, "completion_mask": completion_mask, "attention_mask": attention_mask}


def collate_shared_prompt(examples: list[dict], pad_id: int, max_len: int | None = None) -> dict:
    """[{prompt_ids, chosen_ids, rejected_ids}] -> one row per pair: input_ids/positions [B, T], a pairwise
    attn_mask [B, T, T] (ANDed with causal order by the model) and the scored tokens: score_src (the position
    whose hidden state predicts the token), score_tgt (the token), score_seg (0 chosen, 1 rejected, -1 none).

    max_len caps prompt + response like `collate_preferences` does for each of its rows."""
    built = []
    for ex in examples:
        p = list(ex["prompt_ids"])
        c, r = list(ex["chosen_ids"]), list(ex["rejected_ids"])
        if max_len:
            p = p[:max_len]
            c, r = c[: max_len - len(p)], r[: max_len - len(p)]
        if not p:
            raise ValueError("shared-prompt DPO needs a non-empty prompt (its last token predicts both responses)")
        built.append((p, c, r))
    T = max(len(p) + len(c) + len(r) for p, c, r in built)
    N = max(len(c) + len(r) for _, c, r in built)
    B = len(built)
    out = {"input_ids": torch.full((B, T), pad_id, dtype=torch.long), "positions": torch.zeros((B, T), dtype=torch.long),
           "attn_mask": torch.ones((B, T, T), dtype=torch.bool), "score_src": torch.zeros((B, N), dtype=torch.long),
           "score_tgt": torch.zeros((B, N), dtype=torch.long), "score_seg": torch.full((B, N), -1, dtype=torch.long)}
    for b, (p, c, r) in enumerate(built):
        P, C, R = len(p), len(c), len(r)
        out["input_ids"][b, : P + C + R] = torch.tensor(p + c + r)
        out["positions"][b, : P + C + R] = torch.cat([torch.arange(P + C), torch.arange(P, P + R)])
        out["attn_mask"][b, P + C: P + C + R, P: P + C] = False  # rejected never sees chosen
        # chosen token j is predicted at P-1+j; rejected token j at P-1 (the prompt's end) for j=0, else P+C+j-1
        src = list(range(P - 1, P + C - 1)) + ([P - 1] + list(range(P + C, P + C + R - 1)) if R else [])
        out["score_src"][b, : C + R] = torch.tensor(src, dtype=torch.long)
        out["score_tgt"][b, : C + R] = torch.tensor(c + r, dtype=torch.long)
        out["score_seg"][b, : C + R] = torch.tensor([0] * C + [1] * R)
    return out


def _shared_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs and lengths [chosen(B), rejected(B)] of a `collate_shared_prompt` batch."""
    h = model(batch["input_ids"], positions=batch["positions"], attn_mask=batch["attn_mask"], return_hidden=True)
    seg = batch["score_seg"]
    sel = seg >= 0
    rows = torch.arange(seg.shape[0], device=seg.device)[:, None].expand_as(seg)[sel]
    picked = token_logps(model.project(h[rows, batch["score_src"][sel]]), batch["score_tgt"][sel])
    B = seg.shape[0]
    slot = seg[sel] * B + rows  # chosen rows first, then rejected: the two-row layout's order
    sums = torch.zeros(2 * B, dtype=picked.dtype, device=picked.device).index_add(0, slot, picked)
    lens = torch.zeros(2 * B, dtype=picked.dtype, device=picked.device).index_add(0, slot, torch.ones_like(picked))
    return sums, lens


def sequence_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs and response lengths per response [chosen..., rejected...]. Right padding
    needs no attention mask: causal attention never lets a real token see the padding after it."""
    if "score_seg" in batch:
        return _shared_logps(model, batch)
    logps, mask = response_logps(model, batch["input_ids"], batch["completion_mask"])
    return logps.sum(-1), mask.sum(-1)


class DPOObjective:
    """loss_fn for the trainer; batches come from `collate_preferences` or `collate_shared_prompt`."""

    def __init__(self, ref_model=None, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0):
        self.ref_model, self.beta, self.loss_type, self.label_smoothing = ref_model, beta, loss_type, label_smoothing
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)

    def reference_logps(self, model, batch) -> torch.Tensor:
        if "ref_logps" in batch:  # precomputed once (TRL's precompute_ref_log_probs)
            return batch["ref_logps"]
        if self.ref_model is not None:
            ctx, ref = contextlib.nullcontext(), self.ref_model
        elif lora_modules(model):
            ctx, ref = lora_disabled(model), model
        else:
            raise ValueError("DPO needs a reference: pass ref_model, or train LoRA adapters so the base serves as one")
        with torch.inference_mode(), ctx:
            out = sequence_logps(ref, batch)[0]
        return out.clone()  # a normal tensor again, usable next to autograd tensors

    def __call__(self, model, batch):
        ref = self.reference_logps(model, batch)
        logps, lens = sequence_logps(model, batch)
        pc, pr = logps.chunk(2)
        rc, rr = ref.chunk(2)
        lc, lr_ = lens.chunk(2)
        loss, r_c, r_r = dpo_loss(pc, pr, rc, rr, self.beta, self.loss_type, lc, lr_, self.label_smoothing)
        metrics = {"reward_acc": (r_c > r_r).float().mean().item(), "reward_margin": (r_c - r_r).mean().item(),
                   "chosen_reward": r_c.mean().item(), "rejected_reward": r_r.mean().item()}
        return loss.mean(), metrics


LN2 = math.log(2)  # DPO loss when policy = reference
