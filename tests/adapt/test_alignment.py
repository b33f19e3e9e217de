"""DPO / reward-model / PPO / GRPO objectives: equal TRL's on the same tiny random model and batch, plus properties."""
import copy
import math

import pytest
import torch
from adapt_ref import hf_llama, hf_tokenizer, llmkit_from_hf

from llmkit.adapt import dpo, grpo, ppo, reward
from llmkit.adapt.rollout import Rollout, completion_logps

EXAMPLES = [
    {"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9, 1], "rejected_ids": [10, 1]},
    {"prompt_ids": [11, 12], "chosen_ids": [13, 1], "rejected_ids": [14, 15, 16, 1]},
    {"prompt_ids": [20, 21, 22, 23], "chosen_ids": [24, 1], "rejected_ids": [25, 26, 1]},
]


def _perturbed(hf, seed=1, scale=0.05):
    out = copy.deepcopy(hf)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return out


def _trl_dpo(policy, ref, loss_type, beta):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir="/tmp/llmkit-trl-dpo", report_to=[], use_cpu=True, bf16=False, beta=beta, loss_type=[loss_type])
    ds = Dataset.from_list([{"prompt": "t5", "chosen": " t6", "rejected": " t7"}] * 2)
    return DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=ds, processing_class=hf_tokenizer())


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_loss_matches_trl(loss_type):
    ref_hf = hf_llama()
    pol_hf = _perturbed(ref_hf)
    trainer = _trl_dpo(pol_hf, ref_hf, loss_type, beta=0.3)
    batch = trainer.data_collator(EXAMPLES)
    ours_batch = dpo.collate_preferences(EXAMPLES, pad_id=0)
    assert torch.equal(ours_batch["input_ids"], batch["input_ids"])
    assert torch.equal(ours_batch["completion_mask"], batch["completion_mask"])
    expected = trainer._compute_loss(pol_hf, batch, False)
    objective = dpo.DPOObjective(llmkit_from_hf(ref_hf), beta=0.3, loss_type=loss_type)
    loss, metrics = objective(llmkit_from_hf(pol_hf), ours_batch)
    torch.testing.assert_close(loss, expected.float(), atol=1e-5, rtol=1e-5)


def test_dpo_ln2_at_reference_and_gradient_raises_margin(tiny):
    batch = dpo.collate_preferences(EXAMPLES, pad_id=0)
    ref = copy.deepcopy(tiny)
    obj = dpo.DPOObjective(ref, beta=0.1)
    loss, m = obj(tiny, batch)
    assert abs(loss.item() - math.log(2)) < 1e-6 and m["reward_margin"] == 0
    loss.backward()
    with torch.no_grad():
        for p in tiny.parameters():
            p -= 1.0 * p.grad
    loss2, m2 = obj(tiny, batch)
    assert m2["reward_margin"] > 0 and loss2.item() < math.log(2)


def test_dpo_with_lora_uses_base_as_reference(tiny):
    from llmkit.adapt.peft import apply_lora

    apply_lora(tiny, r=2, alpha=4, targets="all")
    loss, _ = dpo.DPOObjective(None, beta=0.1)(tiny, dpo.collate_preferences(EXAMPLES, pad_id=0))
    assert abs(loss.item() - math.log(2)) < 1e-6  # B = 0: policy = base = reference


def test_kto_properties():
    pol = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    ref = torch.tensor([-1.5, -1.5, -3.0, -3.0])
    desirable = torch.tensor([True, False, True, False])
    loss, z0 = dpo.kto_loss(pol, ref, desirable, pol.roll(1), ref.roll(1), beta=0.5)
    assert z0.item() == 0.0  # mean log-ratio is negative: the KL estimate clamps at zero
    torch.testing.assert_close(loss, torch.stack([1 - torch.sigmoid(torch.tensor(0.25)), 1 - torch.sigmoid(torch.tensor(0.25)),
                                                  1 - torch.sigmoid(torch.tensor(0.0)), 1 - torch.sigmoid(torch.tensor(0.5))]))


def test_reward_loss_matches_trl():
    import transformers
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    torch.manual_seed(0)
    cls = transformers.LlamaForSequenceClassification(copy.deepcopy(hf_llama().config).__class__(
        **{**hf_llama().config.to_dict(), "num_labels": 1})).eval()
    causal = hf_llama()
    causal.model.load_state_dict(cls.model.state_dict())
    ours = reward.RewardModel(llmkit_from_hf(causal)).eval()
    ours.score.weight.data.copy_(cls.score.weight.data)
    args = RewardConfig(output_dir="/tmp/llmkit-trl-rm", report_to=[], use_cpu=True, bf16=False)
    ds = Dataset.from_list([{"chosen": "t5 t6", "rejected": "t7"}] * 2)
    trainer = RewardTrainer(model=cls, args=args, train_dataset=ds, processing_class=hf_tokenizer())
    batch = dpo.collate_preferences(EXAMPLES, pad_id=0)
    trl_loss = trainer.compute_loss(cls, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    loss, metrics = reward.RewardObjective()(ours, batch)
    torch.testing.assert_close(loss, trl_loss.float(), atol=1e-5, rtol=1e-5)


def test_reward_losses_properties():
    r = torch.zeros(4)
    assert abs(reward.pairwise_loss(r, r).item() - math.log(2)) < 1e-7
    assert len(reward.ranking_pairs(5)) == 10
    ranked = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert reward.kwise_loss(ranked) < reward.kwise_loss(ranked.flip(-1))
    assert reward.listwise_loss(ranked) < reward.listwise_loss(ranked.flip(-1))
    # K = 2: the Plackett-Luce NLL is the pairwise loss
    torch.testing.assert_close(reward.listwise_loss(ranked[:, :2]), reward.pairwise_loss(ranked[:, 0], ranked[:, 1]))


def test_bradley_terry_and_elo_recover_strengths():
    g = torch.Generator().manual_seed(0)
    true = torch.tensor([0.1, 0.2, 0.3, 0.4])
    games = []
    for _ in range(3000):
        a, b = torch.randperm(4, generator=g)[:2].tolist()
        win = torch.rand(1, generator=g).item() < true[a] / (true[a] + true[b])
        games.append((a, b) if win else (b, a))
    p = reward.bradley_terry(4, games)
    assert (p - true).abs().max() < 0.04
    assert torch.equal(reward.elo(4, games, k=4).argsort(), torch.arange(4))


def _rollout(P=3, C=5, B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    comp_mask = torch.ones(B, C, dtype=torch.long)
    comp_mask[1, 3:] = 0
    comp_mask[3, 1:] = 0
    return Rollout(torch.randint(4, 90, (B, P), generator=g), torch.ones(B, P, dtype=torch.long),
                   torch.randint(4, 90, (B, C), generator=g) * comp_mask, comp_mask)


def _trl_grpo(hf, loss_type):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir="/tmp/llmkit-trl-grpo", report_to=[], use_cpu=True, bf16=False, beta=0.0, loss_type=loss_type,
                      num_generations=2, per_device_train_batch_size=2, max_completion_length=5,
                      use_bias_correction_kl=False)  # the GRPO paper's plain k3 KL (TRL 1.x adds a ratio factor)
    tr = GRPOTrainer(model=hf, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                     train_dataset=Dataset.from_list([{"prompt": "t5 t6"}] * 2), processing_class=hf_tokenizer())
    tr.model.eval()
    return tr


@pytest.mark.parametrize("loss_type,beta,per_token_adv", [("grpo", 0.1, False), ("bnpo", 0.0, True)])
def test_grpo_and_ppo_policy_loss_match_trl(loss_type, beta, per_token_adv):
    """GRPO's loss, and (bnpo, beta=0, per-token advantages) PPO's clipped surrogate, against TRL's GRPOTrainer."""
    hf = hf_llama()
    ours = llmkit_from_hf(hf)
    r = _rollout()
    g = torch.Generator().manual_seed(3)
    adv = torch.randn((4, 5) if per_token_adv else (4,), generator=g)
    with torch.no_grad():
        now = completion_logps(ours, r)
    old = now + 0.3 * torch.randn(now.shape, generator=g)  # ratios both inside and outside [1-eps, 1+eps]
    ref = now + 0.2 * torch.randn(now.shape, generator=g)
    trainer = _trl_grpo(hf, loss_type)
    trainer.beta = beta
    inputs = {"prompt_ids": r.prompt_ids, "prompt_mask": r.prompt_mask, "completion_ids": r.completion_ids,
              "completion_mask": r.completion_mask, "advantages": adv, "old_per_token_logps": old,
              "ref_per_token_logps": ref}
    expected = trainer._compute_loss(hf, inputs)
    if beta:
        loss, _ = grpo.GRPOObjective(beta=beta, loss_type=loss_type)(ours, {**r.to_batch(), "advantages": adv,
                                                                            "old_logps": old, "ref_logps": ref})
    else:
        loss, clipfrac = ppo.clipped_policy_loss(completion_logps(ours, r), old, adv, r.completion_mask.float(), 0.2)
        assert 0 < clipfrac < 1
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    a = grpo.group_advantages(r, 4)
    g = r.view(2, 4)
    torch.testing.assert_close(a[:4], (g[0] - g[0].mean()) / (g[0].std() + 1e-4))
    assert torch.equal(a[4:], torch.zeros(4))  # a group with equal rewards carries no signal


def test_gae_matches_hand_calculation():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.2, 0.4]])
    mask = torch.ones(1, 3)
    gamma, lam = 0.9, 0.8
    d2 = 1.0 - 0.4
    d1 = 0.0 + gamma * 0.4 - 0.2
    d0 = 0.0 + gamma * 0.2 - 0.5
    a2, a1 = d2, d1 + gamma * lam * d2
    a0 = d0 + gamma * lam * a1
    adv, ret = ppo.gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2]]))
    torch.testing.assert_close(ret, adv + values)
    # padding after the response contributes nothing
    adv_p, _ = ppo.gae(torch.tensor([[0.0, 0.0, 1.0, 5.0]]), torch.tensor([[0.5, 0.2, 0.4, 9.0]]), torch.tensor([[1.0, 1, 1, 0]]), gamma, lam)
    torch.testing.assert_close(adv_p[:, :3], adv)


def test_kl_rewards_clip_and_whiten():
    lp = torch.randn(3, 4)
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    r = ppo.kl_rewards(torch.tensor([1.0, 2.0, 3.0]), lp, lp, mask, beta=0.1)
    assert r.sum().item() == 6.0 and r[0, 3] == 1 and r[1, 1] == 2 and r[2, 0] == 3  # KL = 0 when pi = ref
    assert torch.equal(ppo.kl_estimate(lp, lp, "k3"), torch.zeros_like(lp))
    w = ppo.whiten(torch.randn(3, 4) * 5 + 2, mask)
    vals = w[mask.bool()]
    assert abs(vals.mean().item()) < 1e-6 and abs(vals.std().item() - 1) < 1e-4
    # the clip: a ratio of 2 with positive advantage earns no more than 1 + eps
    loss, frac = ppo.clipped_policy_loss(torch.log(torch.tensor([[2.0]])), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2)
    assert abs(loss.item() + 1.2) < 1e-6 and frac.item() == 1.0
    v = ppo.clipped_value_loss(torch.tensor([[3.0]]), torch.tensor([[0.0]]), torch.tensor([[3.0]]), torch.ones(1, 1), 0.2)
    assert abs(v.item() - 0.5 * (3 - 0.2) ** 2) < 1e-6


@pytest.mark.parametrize("lora", [False, True])
def test_dpo_shared_prompt_equals_two_row_layout(tiny, lora):
    """[prompt | chosen | rejected] rows: same loss, metrics and gradients (through the prompt too) as the
    [chosen..., rejected...] layout that matches TRL."""
    from llmkit.adapt.peft import apply_lora

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tiny.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    ref = None
    if lora:
        apply_lora(tiny, r=2, alpha=4, targets="all")
        with torch.no_grad():
            for n, p in tiny.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.3, generator=g)
    else:
        ref = copy.deepcopy(tiny)
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    examples = EXAMPLES + [{"prompt_ids": [30], "chosen_ids": [31, 32, 33, 34, 1], "rejected_ids": [1]}]
    obj = dpo.DPOObjective(ref, beta=0.2)
    shared = dpo.collate_shared_prompt(examples, pad_id=0)
    assert shared["input_ids"].shape[1] < 2 * dpo.collate_preferences(examples, 0)["input_ids"].shape[1]
    results = []
    for batch in (dpo.collate_preferences(examples, pad_id=0), shared):
        tiny.zero_grad(set_to_none=True)
        loss, metrics = obj(tiny, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in tiny.named_parameters() if p.grad is not None}
        results.append((loss.detach(), metrics, grads))
    (l1, m1, g1), (l2, m2, g2) = results
    torch.testing.assert_close(l2, l1, atol=1e-6, rtol=1e-5)
    assert m1.keys() == m2.keys() and all(abs(m1[k] - m2[k]) < 1e-5 for k in m1)
    assert g1.keys() == g2.keys() and len(g1) > 0
    assert any(n.startswith("layers.0.attn") for n in g1)  # gradients reach the prompt's keys/values
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], atol=1e-6, rtol=1e-4)


def test_shared_prompt_logps_equal_per_response_logps(tiny):
    shared = dpo.collate_shared_prompt(EXAMPLES, pad_id=0)
    two_row = dpo.collate_preferences(EXAMPLES, pad_id=0)
    with torch.no_grad():
        a, la = dpo.sequence_logps(tiny, two_row)
        b, lb = dpo.sequence_logps(tiny, shared)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert torch.equal(lb, la)
    with pytest.raises(ValueError, match="non-empty prompt"):
        dpo.collate_shared_prompt([{"prompt_ids": [], "chosen_ids": [3], "rejected_ids": [4]}], 0)
