"""Bottleneck adapters, prefix tuning and prompt tuning: init = base, parameter counts, frozen base, learning."""
import torch

from llmkit.adapt.adapters import PrefixTuning, PromptTuning, add_adapters

IDS = torch.randint(4, 90, (3, 10), generator=torch.Generator().manual_seed(0))


def _sharpen(model):
    """A random tiny model's head (std 0.02) cannot reach large logits; scale it as training would."""
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


def _train(module, steps=30, lr=3e-2, target=7):
    """Teach `module` to always predict `target`; returns the final probability of it."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        logits = module(IDS)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.full((IDS.numel(),), target))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return module(IDS).softmax(-1)[..., target].mean().item()


def test_bottleneck_adapter(tiny):
    _sharpen(tiny)
    base = tiny(IDS)
    names = add_adapters(tiny, r=4)
    assert len(names) == 2 * tiny.cfg.n_layers
    assert torch.equal(tiny(IDS), base)  # zero up-projection: output = base at init
    trainable = [(n, p) for n, p in tiny.named_parameters() if p.requires_grad]
    d, r = tiny.cfg.d_model, 4
    assert sum(p.numel() for _, p in trainable) == len(names) * (2 * d * r + r + d)
    tiny(IDS).sum().backward()
    assert all(p.grad is None for n, p in tiny.named_parameters() if "adapter" not in n)
    assert _train(tiny, steps=20) > 0.5


def test_prefix_tuning_shapes_frozen_base_and_learning(tiny):
    pt = PrefixTuning(_sharpen(tiny), n_prefix=4, reparam_hidden=32)
    kv = pt.kv()
    assert kv.shape == (tiny.cfg.n_layers, 2, tiny.cfg.n_kv_heads, 4, tiny.cfg.head_dim)
    p0 = torch.nn.functional.softmax(tiny(IDS), -1)[..., 7].mean().item()
    assert _train(pt, steps=40) > max(0.5, 5 * p0)
    assert all(not p.requires_grad for p in tiny.parameters())
    with torch.no_grad():
        before = pt(IDS)
        pt.freeze_reparam()
        assert pt.mlp is None and pt.prefix.shape == kv.shape
        torch.testing.assert_close(pt(IDS), before)


def test_prefix_matches_manual_attention_over_prefix(tiny):
    """A prefix equal to the model's own cached K/V of a real prompt gives the logits of prompt + input run together."""
    prompt = torch.randint(4, 90, (1, 4))
    cache = tiny.new_cache(1, 4)
    with torch.no_grad():
        tiny(prompt, cache=cache)
        pt = PrefixTuning(tiny, n_prefix=4, reparam_hidden=None)
        pt.prefix.data = torch.stack([torch.stack([cache.k[l][0, :, :4], cache.v[l][0, :, :4]]) for l in range(tiny.cfg.n_layers)])
        x = IDS[:1]
        full = tiny(torch.cat([prompt, x], 1))[:, 4:]
        torch.testing.assert_close(pt(x, positions=torch.arange(4, 4 + x.shape[1])[None]), full, atol=1e-5, rtol=1e-5)


def test_prompt_tuning(tiny):
    _sharpen(tiny)
    base = tiny(IDS)
    pt = PromptTuning(tiny, n_virtual=4, init_ids=[10, 11, 12, 13])
    out = pt(IDS)
    assert out.shape == base.shape and not torch.allclose(out, base)  # the prompt changes the outputs
    out.sum().backward()
    assert pt.prompt.grad is not None and all(p.grad is None for p in tiny.parameters())
    p0 = base.softmax(-1)[..., 7].mean().item()
    assert _train(pt, steps=40) > 5 * p0  # the input-layer prompt alone steers a frozen model
    assert torch.equal(tiny(IDS), base)  # the base itself is untouched outside the wrapper
    ptm = PromptTuning(tiny, n_virtual=4, encoder="mlp")
    assert ptm(IDS).shape == base.shape
