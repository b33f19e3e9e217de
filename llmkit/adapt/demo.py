"""Demo hook of the adaptation stage (survey §5): instruction-tune, then align with verifiable rewards, the small
pre-trained demo model on arithmetic the project generates, and show answers and scores before and after.

`run(model, tokenizer, out_dir)` -> (model, tokenizer). Stages, each through `llmkit.adapt.cli.train` (the one
Trainer): SFT on worked solutions ("4 * 2 = 8. 3 + 8 = 11. The answer is 11."), loss on the assistant turn only,
packed rows; then a few GRPO steps with the exact-answer reward. Scores are exact-match accuracy on held-out
problems (different seed, greedy decoding). Budget: about two minutes on two CPU cores.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .cli import render_prompt, stop_ids, time_budget_hook, train
from .rewards import arithmetic_problems, extract_answer
from .rollout import sample

# one- and two-step problems; the held-out ones are two-step questions never seen in training, whose single
# steps mostly are: scoring them measures composing learned facts with the worked-step format
TRAIN = dict(n=6000, seed=0, n_terms=(2, 3), max_operand=9, ops="+-*")
HELD_OUT = dict(n=60, seed=12345, n_terms=(3, 3), max_operand=9, ops="+-*")


@torch.no_grad()
def answer(model, tok, questions: list[str], max_new_tokens: int = 32) -> list[str]:
    prompts = [render_prompt(tok, q) for q in questions]
    r = sample(model, prompts, max_new_tokens, stop_ids(tok), tok.pad_token_id or 0, temperature=0.0)
    return [tok.decode(c, skip_special_tokens=True).strip() for c in r.completions()]


def score(model, tok, problems: list[dict]) -> tuple[float, list[str]]:
    outs = answer(model, tok, [p["question"] for p in problems])
    right = [extract_answer(o) == p["answer"] for o, p in zip(outs, problems)]
    return sum(right) / len(right), outs


def _show(title: str, problems: list[dict], outs: list[str], k: int = 4) -> None:
    print(title)
    for p, o in list(zip(problems, outs))[:k]:
        print(f"  Q: {p['question']:<22} A: {o[:70]!r}  (expected {p['answer']})")


def run(model, tokenizer, out_dir, sft_steps: int = 1500, grpo_steps: int = 10, budget_s: float = 100.0):
    """Instruction-tune (SFT, then GRPO while the budget lasts) and print before/after answers and scores."""
    t0 = time.time()
    out = Path(out_dir)
    held = arithmetic_problems(**HELD_OUT)
    acc0, outs0 = score(model, tokenizer, held)
    _show(f"before: exact-match accuracy {acc0:.0%} on {len(held)} held-out problems", held, outs0)
    train_cfg = {"micro_batch_size": 8, "seq_len": 128, "lr": 2e-3, "weight_decay": 0.0, "warmup_steps": 10,
                 "schedule": "constant", "log_every": 5, "tensorboard": False, "device": "cpu"}
    # the held-out questions never appear in the SFT data
    sft = {"base": "<demo model>", "_path": str(out / "sft.yaml"),
           "data": {"kind": "arithmetic", **TRAIN, "max_len": 80, "packed": True,
                    "exclude": sorted({p["question"] for p in held})},
           "train": {**train_cfg, "max_steps": sft_steps}}
    print(f"SFT: up to {sft_steps} steps or {0.6 * budget_s:.0f}s, full fine-tuning, loss on assistant tokens only, "
          f"packed to 128 tokens")
    final, _, trainer, _ = train("sft", sft, out / "sft", model=model, tok=tokenizer, hooks=[time_budget_hook(0.6 * budget_s)])
    acc1, outs1 = score(model, tokenizer, held)
    _show(f"after SFT ({trainer.step} steps, loss {final.get('loss', float('nan')):.3f}): exact-match accuracy {acc1:.0%}",
          held, outs1)
    acc2, left = None, budget_s - (time.time() - t0)
    if grpo_steps and left > 10:
        grpo = {"base": "<demo model>", "_path": str(out / "grpo.yaml"), "data": {"kind": "arithmetic", **{**TRAIN, "seed": 1}},
                "method": {"group": 8, "prompts_per_step": 4, "beta": 0.0, "max_new_tokens": 24, "temperature": 1.0},
                "train": {**train_cfg, "lr": 3e-5, "warmup_steps": 0, "max_steps": grpo_steps, "log_every": 1}}
        print(f"GRPO: up to {grpo_steps} steps, 8 samples per prompt, reward = exact answer")
        train("grpo", grpo, out / "grpo", model=model, tok=tokenizer, hooks=[time_budget_hook(left - 8)])
        acc2, outs2 = score(model, tokenizer, held)
        _show(f"after GRPO: exact-match accuracy {acc2:.0%}", held, outs2)
    tail = f" -> {acc2:.0%} (GRPO)" if acc2 is not None else " (GRPO skipped: out of time)"
    print(f"adaptation: held-out accuracy {acc0:.0%} -> {acc1:.0%} (SFT){tail} in {time.time() - t0:.0f}s")
    return model, tokenizer
