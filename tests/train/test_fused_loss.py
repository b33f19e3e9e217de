"""Fused projection + cross-entropy equals the plain loss (values and gradients), fp32 and bf16 autocast."""
import pytest
import torch
import torch.nn.functional as F

from llmkit.train.fused_loss import linear_cross_entropy
from llmkit.train.objectives import cross_entropy, lm_loss


def _reference(h, w, y, z):
    return cross_entropy(h @ w.t(), y, z)


@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_fused_matches_plain_fp32(z_loss):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 37, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (2, 37), generator=g)
    y[0, :5] = -100  # ignored targets
    ref, rm = _reference(h, w, y, z_loss)
    gh_ref, gw_ref = torch.autograd.grad(ref * 1.7, (h, w))
    out, m = linear_cross_entropy(h, w, y, z_loss, chunk=16)  # several chunks, the last one partial
    gh, gw = torch.autograd.grad(out * 1.7, (h, w))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(m["ce"], rm["ce"])
    torch.testing.assert_close(gh, gh_ref)
    torch.testing.assert_close(gw, gw_ref)
    with torch.no_grad():  # evaluation: no gradient work, same value
        torch.testing.assert_close(linear_cross_entropy(h, w, y, z_loss, chunk=16)[0], ref.detach())


def test_fused_matches_plain_under_bf16_autocast():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(64, 32, generator=g, requires_grad=True)
    w = (0.2 * torch.randn(300, 32, generator=g)).requires_grad_()
    y = torch.randint(0, 300, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy((h @ w.t()).float(), y)
        out, _ = linear_cross_entropy(h, w, y, chunk=24)
    gh_ref, gw_ref = torch.autograd.grad(ref, (h, w))
    gh, gw = torch.autograd.grad(out, (h, w))
    assert gh.dtype == h.dtype and gw.dtype == w.dtype
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(gh, gh_ref, atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(gw, gw_ref, atol=2e-3, rtol=2e-2)


@pytest.mark.parametrize("tie", [True, False])
def test_lm_loss_fused_path_equals_logits_path(tie):
    from llmkit.model import ModelConfig, Transformer

    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, pos="rope",
                      activation="swiglu", norm="rmsnorm", tie_embeddings=tie)
    torch.manual_seed(0)
    model = Transformer(cfg).double()
    assert model.fused_head_weight() is not None
    x = torch.randint(0, 97, (3, 17))
    batch = {"input_ids": x[:, :-1], "labels": x[:, 1:]}
    loss, _ = lm_loss(model, batch, z_loss=1e-4)
    assert type(loss.grad_fn).__name__ == "LinearCrossEntropyBackward"
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ref, _ = cross_entropy(model(batch["input_ids"]), batch["labels"], 1e-4)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    torch.testing.assert_close(loss, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_a_lora_head_runs_its_module_not_the_fused_base_weight():
    """LoRA on lm_head: the fused loss would read the frozen base weight and leave the adapter without gradient;
    the head's module runs instead, and the loss equals the logits path."""
    from llmkit.adapt.peft import apply_lora
    from llmkit.model import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=97, d_model=32, n_layers=1, n_heads=4, max_seq_len=16,
                                    tie_embeddings=False)).double()
    apply_lora(model, r=4, targets=("lm_head",))
    torch.nn.init.normal_(model.lm_head.lora_B.weight)  # a non-zero adapter: it changes the loss
    assert model.fused_head_weight() is None
    x = torch.randint(0, 97, (2, 9))
    batch = {"input_ids": x[:, :-1], "labels": x[:, 1:]}
    loss, _ = lm_loss(model, batch)
    torch.testing.assert_close(loss, cross_entropy(model(batch["input_ids"]), batch["labels"])[0])
    loss.backward()
    assert model.lm_head.lora_B.weight.grad.abs().sum() > 0


def test_moe_aux_loss_is_added_through_a_ddp_style_wrapper():
    """DDP exposes the model as `.module` and forwards no attributes: the MoE auxiliary loss is still added."""
    from llmkit.model import ModelConfig, Transformer

    from tests.train.conftest import DDPLike

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, n_experts=4,
                                    moe_top_k=2))
    x = torch.randint(0, 64, (2, 9))
    batch = {"input_ids": x[:, :-1], "labels": x[:, 1:]}
    plain, pm = lm_loss(model, batch)
    wrapped, wm = lm_loss(DDPLike(model), batch)
    assert "moe_aux" in pm and "moe_aux" in wm
    torch.testing.assert_close(wrapped, plain)
    torch.testing.assert_close(wrapped, wm["ce"] + wm["moe_aux"])
