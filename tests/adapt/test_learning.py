"""Learning signals (slow): RM above chance on held-out HH-RLHF pairs, synthetic RM > 95%, GRPO raises an exact-answer
reward on arithmetic, PPO raises a toy reward with bounded KL, DPO's implicit-reward accuracy climbs."""
import copy
import random

import pytest
import torch

from llmkit.adapt import dpo, grpo, ppo, reward
from llmkit.adapt.rollout import sample
from llmkit.model.config import ModelConfig
from llmkit.model.transformer import Transformer
from llmkit.train.config import TrainConfig
from llmkit.train.trainer import Trainer

pytestmark = pytest.mark.slow


def _cfg(steps, lr, mb=16, **kw):
    return TrainConfig(max_steps=steps, micro_batch_size=mb, lr=lr, warmup_steps=0, weight_decay=0.0, schedule="constant",
                       log_every=kw.pop("log_every", steps), progress=False, tensorboard=False, device="cpu", **kw)


def _model(vocab, d=64, layers=2, seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=4, max_seq_len=256))


def test_reward_model_beats_chance_on_heldout_hh_rlhf(shared_data):
    from llmkit.adapt import instruct_data as idata
    from llmkit.adapt.cli import pair_accuracy
    from llmkit.adapt.pipeline import PairLoader
    from llmkit.tokenizer.train import train_tokenizer

    rows = idata.read_jsonl(shared_data / "hh-rlhf" / "helpful-base" / "test.jsonl.gz")
    rows += idata.read_jsonl(shared_data / "hh-rlhf" / "harmless-base" / "test.jsonl.gz")
    random.Random(0).shuffle(rows)
    pairs = [idata.hh_pairs(r["chosen"], r["rejected"]) for r in rows]
    tok = train_tokenizer([p["prompt"] + p["chosen"] for p in pairs[:1500]], None, vocab_size=1000, chat_template=None)
    enc = []
    for p in pairs:
        q = tok.encode(p["prompt"])[-48:]
        enc.append({"prompt_ids": q, "chosen_ids": tok.encode(p["chosen"])[:80], "rejected_ids": tok.encode(p["rejected"])[:80]})
    train, held = enc[:-600], enc[-600:]
    rm = reward.RewardModel(_model(tok.vocab_size))
    Trainer(rm, _cfg(150, 1e-3), PairLoader(train, 16, 0), loss_fn=reward.RewardObjective()).fit()
    acc = pair_accuracy(rm, held, 0)
    assert acc > 0.56, acc  # chance is 0.5; 600 pairs: 0.56 is ~3 standard errors above it


def test_synthetic_reward_model_over_95_percent():
    """Preference: responses containing token 'good' (7) win. A tiny RM learns it in well under a minute."""
    g = random.Random(0)

    def pair():
        p = [g.randrange(10, 60) for _ in range(4)]
        base = [g.randrange(10, 60) for _ in range(5)]
        good = list(base)
        good[g.randrange(5)] = 7
        return {"prompt_ids": p, "chosen_ids": good, "rejected_ids": base}

    from llmkit.adapt.cli import pair_accuracy
    from llmkit.adapt.pipeline import PairLoader

    rm = reward.RewardModel(_model(64, d=32))
    Trainer(rm, _cfg(80, 3e-3), PairLoader([pair() for _ in range(600)], 16, 0), loss_fn=reward.RewardObjective()).fit()
    assert pair_accuracy(rm, [pair() for _ in range(200)], 0) > 0.95


class DigitTok:
    """Characters 0-9 + - * = ? and EOS: enough for the arithmetic task."""
    chars = "0123456789+-*= ?"
    eos_token_id, pad_token_id, bos_token_id = 16, 17, None
    vocab_size = 18

    def encode(self, s, add_special_tokens=False):
        return [self.chars.index(c) for c in s]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.chars[i] for i in ids if i < 16)


def _arith(n, seed):
    r = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = r.randrange(10), r.randrange(10)
        out.append({"prompt_ids": DigitTok().encode(f"{a}+{b}="), "answer": a + b})
    return out


def _reward_fn(items, completions):
    tok = DigitTok()
    return [float(tok.decode(c) == str(it["answer"])) for it, c in zip(items, completions)]


@torch.no_grad()
def _expected_reward(model, items, n=8):
    g = torch.Generator().manual_seed(123)
    r = sample(model, [it["prompt_ids"] for it in items] * n, 3, 16, 17, temperature=1.0, generator=g)
    return sum(_reward_fn(items * n, r.completions())) / (len(items) * n)


def test_grpo_raises_exact_answer_reward_on_arithmetic():
    from llmkit.adapt.sft import SFTLoader

    tok = DigitTok()
    model = _model(18, d=64)
    # a short SFT warm start so some sampled answers are right (GRPO needs non-zero reward variance)
    exs = []
    for it in _arith(400, 0):
        ids = it["prompt_ids"] + tok.encode(str(it["answer"])) + [16]
        exs.append({"input_ids": ids, "labels": [-100] * len(it["prompt_ids"]) + ids[len(it["prompt_ids"]):]})
    Trainer(model, _cfg(60, 3e-3, mb=32), SFTLoader(exs, 32, pad_id=17)).fit()
    held = _arith(40, 99)
    before = _expected_reward(model, held)
    ref = copy.deepcopy(model).eval()
    data = grpo.GRPORollouts(model, _arith(200, 1), _reward_fn, ref, eos_id=16, pad_id=17, prompts_per_step=12, group=8,
                             max_new_tokens=3, beta=0.02)
    rewards = []
    Trainer(model, _cfg(40, 5e-4, log_every=1), data, loss_fn=grpo.GRPOObjective(beta=0.02),
            hooks=[lambda tr, rec: rewards.append(rec["reward"])]).fit()
    after = _expected_reward(model, held)
    first, last = sum(rewards[:8]) / 8, sum(rewards[-8:]) / 8
    assert 0.05 < before < 0.95 and last > first + 0.05 and after >= before, (before, after, first, last)


def test_ppo_raises_toy_reward_with_bounded_kl():
    """Reward = number of 'X' (token 7) among 6 sampled tokens; mean score rises, KL to the reference stays bounded."""
    policy = _model(32, d=32)
    ac = ppo.ActorCritic(policy)
    ref = copy.deepcopy(policy).eval()
    prompts = [[random.Random(i).randrange(8, 30) for _ in range(3)] for i in range(50)]
    score = lambda items, comps: [sum(t == 7 for t in c) / 6 for c in comps]  # noqa: E731
    data = ppo.PPORollouts(ac, prompts, score, ref, eos_id=None, pad_id=0, rollout_batch=32, mini_batch=16, ppo_epochs=2,
                           max_new_tokens=6, kl_coef=0.02)
    history = []
    Trainer(ac, _cfg(40, 3e-3), data, loss_fn=ppo.PPOObjective(vf_coef=0.1),
            hooks=[lambda tr, rec: history.append((rec["score"], rec["kl"]))], ).fit()
    assert history[-1][0] > 0.3 and history[-1][1] < 5.0, history


def test_dpo_implicit_reward_accuracy_climbs():
    g = random.Random(0)

    def pair():
        p = [g.randrange(10, 60) for _ in range(4)]
        return {"prompt_ids": p, "chosen_ids": [7, g.randrange(10, 60)], "rejected_ids": [8, g.randrange(10, 60)]}

    from llmkit.adapt.pipeline import PairLoader

    model = _model(64, d=32)
    obj = dpo.DPOObjective(copy.deepcopy(model), beta=0.5)
    held = dpo.collate_preferences([pair() for _ in range(64)], 0)
    with torch.no_grad():
        acc0 = obj(model, held)[1]["reward_acc"]
    Trainer(model, _cfg(30, 3e-3), PairLoader([pair() for _ in range(400)], 16, 0), loss_fn=obj).fit()
    with torch.no_grad():
        acc1 = obj(model, held)[1]["reward_acc"]
    assert acc0 == 0.0 and acc1 > 0.9  # ties at the reference count as wrong


def test_qat_4bit_recovers_more_than_ptq():
    """Tiny LM on a lookup task: 4-bit RTN after training loses accuracy; a few QAT steps (fake quant + STE)
    from the same weights, then real 4-bit, keep more of it."""
    from llmkit.adapt import quantize as qz

    g = torch.Generator().manual_seed(0)
    table = torch.randperm(48, generator=g) + 16

    def batch(n=32):
        x = torch.randint(16, 64, (n, 12), generator=g)
        y = table[x - 16]
        ids = torch.stack([x, y], -1).flatten(1)  # x1 y1 x2 y2 ...
        labels = ids.clone()
        labels[:, 0::2] = -100  # loss on the looked-up tokens only
        return {"input_ids": ids[:, :-1], "labels": labels[:, 1:]}

    def acc(m):
        """(accuracy, cross-entropy) on the looked-up tokens of a fixed evaluation batch."""
        b = eval_batch
        with torch.no_grad():
            logits = m(b["input_ids"])
        sel = b["labels"] != -100
        ce = torch.nn.functional.cross_entropy(logits[sel], b["labels"][sel]).item()
        return (logits.argmax(-1)[sel] == b["labels"][sel]).float().mean().item(), ce

    eval_batch = batch(128)
    model = _model(64, d=48)
    Trainer(model, _cfg(150, 3e-3), (batch() for _ in iter(int, 1))).fit()
    fp = acc(model)
    ptq = acc(qz.quantize_model(copy.deepcopy(model), bits=4, skip=("lm_head",)))
    qat = qz.prepare_qat(copy.deepcopy(model), w_bits=4)
    Trainer(qat, _cfg(40, 1e-3), (batch() for _ in iter(int, 1))).fit()
    after = acc(qz.convert_qat(qat))
    # accuracy saturates on this task, so compare the loss: QAT's real 4-bit model is closer to (or past) fp
    assert fp[0] > 0.9 and after[0] >= ptq[0] and after[1] < ptq[1], (fp, ptq, after)
