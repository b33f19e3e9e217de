"""E3: AdamW decay groups vs torch, Adafactor vs transformers (factored state), Muon; convergence on a quadratic."""
import os

import pytest
import torch

from llmkit.train.optim import Adafactor, Muon, build_optimizer, newton_schulz, param_groups
from tests.train.conftest import tiny_model, train_cfg

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _grads(model, seed=1):
    torch.manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn_like(p)


def test_decay_groups_skip_norms_biases_embeddings():
    m = tiny_model(qkv_bias=True, norm="layernorm", pos="learned")
    groups = param_groups(list(m.named_parameters()), 0.1)
    names = {id(p): n for n, p in m.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert "layers.0.attn.q.weight" in decay and "lm_head.weight" in decay
    assert {"embed.weight", "pos_embed.weight", "layers.0.attn.q.bias", "layers.0.attn_norm.weight",
            "layers.0.attn_norm.bias", "norm.weight"} <= no_decay
    assert decay.isdisjoint(no_decay) and len(decay | no_decay) == len(names)


def test_adamw_step_equals_torch():
    cfg = train_cfg(optimizer="adamw", lr=1e-3, weight_decay=0.1)
    a, b = tiny_model(), tiny_model()
    opt = build_optimizer(a, cfg)
    nd = lambda n, p: p.dim() < 2 or n.startswith("embed")  # noqa: E731
    ref = torch.optim.AdamW([
        {"params": [p for n, p in b.named_parameters() if not nd(n, p)], "weight_decay": 0.1},
        {"params": [p for n, p in b.named_parameters() if nd(n, p)], "weight_decay": 0.0}],
        lr=1e-3, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for step in range(3):
        _grads(a, step)
        _grads(b, step)
        opt.step()
        ref.step()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7, msg=n)


def test_adafactor_matches_transformers_and_state_is_factored():
    from transformers.optimization import Adafactor as HFAdafactor

    torch.manual_seed(0)
    w0 = torch.randn(48, 32)
    b0 = torch.randn(32)
    ours = [torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())]
    ref = [torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())]
    o = Adafactor(ours, lr=1e-2, beta1=0.9, weight_decay=0.01)
    r = HFAdafactor(ref, lr=1e-2, beta1=0.9, weight_decay=0.01, scale_parameter=False, relative_step=False,
                    warmup_init=False)
    for step in range(5):
        g = torch.Generator().manual_seed(step)
        for p, q in zip(ours, ref):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        o.step()
        r.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    st = o.state[ours[0]]
    assert st["exp_avg_sq_row"].shape == (48,) and st["exp_avg_sq_col"].shape == (32,)
    assert "exp_avg_sq" not in st  # O(n + m) second moments for an n x m matrix, not O(nm)


def _quadratic(opt_fn, steps=300):
    torch.manual_seed(0)
    target = torch.randn(16, 16)
    w = torch.nn.Parameter(torch.zeros(16, 16))
    opt = opt_fn([w])
    start = float(((w.detach() - target) ** 2).sum())
    for _ in range(steps):
        opt.zero_grad()
        loss = ((w - target) ** 2).sum()
        loss.backward()
        opt.step()
    return start, float(((w.detach() - target) ** 2).sum())


@pytest.mark.parametrize("name", ["adamw", "adafactor", "muon"])
def test_converges_on_quadratic(name):
    fns = {"adamw": lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.0),
           "adafactor": lambda ps: Adafactor(ps, lr=0.05, beta1=0.9),
           "muon": lambda ps: Muon([{"params": ps, "muon": True}], lr=0.05, momentum=0.9)}
    start, end = _quadratic(fns[name])
    assert end < 1e-2 * start, (name, start, end)


def test_newton_schulz_orthogonalises():
    torch.manual_seed(0)
    g = torch.randn(32, 64)
    x = newton_schulz(g, steps=5)
    s = torch.linalg.svdvals(x)
    assert 0.6 < float(s.min()) and float(s.max()) < 1.25  # the quintic iteration lands singular values near 1
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    assert torch.nn.functional.cosine_similarity(x.flatten(), (u @ vh).flatten(), dim=0) > 0.95


def test_muon_groups_route_hidden_matrices_only():
    m = tiny_model()
    opt = build_optimizer(m, train_cfg(optimizer="muon"))
    names = {id(p): n for n, p in m.named_parameters()}
    muon = {names[id(p)] for g in opt.param_groups if g["muon"] for p in g["params"]}
    adam = {names[id(p)] for g in opt.param_groups if not g["muon"] for p in g["params"]}
    assert "layers.1.mlp.down.weight" in muon and "layers.0.attn.q.weight" in muon
    assert {"embed.weight", "lm_head.weight", "norm.weight"} <= adam
    _grads(m)
    before = {n: p.clone() for n, p in m.named_parameters()}
    opt.step()
    assert all(not torch.equal(before[n], p) for n, p in m.named_parameters())


def test_trainable_subset_only():
    m = tiny_model()
    sub = [m.layers[0].attn.q.weight]
    opt = build_optimizer(m, train_cfg(), params=sub)
    assert sum(len(g["params"]) for g in opt.param_groups) == 1
