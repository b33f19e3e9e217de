"""Quantisation: round-trip bounds, int4 packing, NF4 levels, QLoRA, GPTQ < RTN, SmoothQuant exactness, LLM.int8(), QAT STE."""
import copy

import pytest
import torch

from llmkit.adapt import ptq, quantize as qz

# bitsandbytes' NF4 table (functional.py, get_4bit_type("nf4")), the values QLoRA ships
BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
           -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
           0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
           0.7229568362236023, 1.0]


@pytest.mark.parametrize("bits,group,sym", [(8, None, True), (4, None, True), (4, 16, False), (3, 8, True), (8, 32, False)])
def test_roundtrip_error_within_half_step(bits, group, sym):
    w = torch.randn(24, 64) * torch.linspace(0.1, 3, 64)
    q, s, z = qz.quantize_tensor(w, bits, group, sym)
    lo, hi = qz.qrange(bits, sym)
    assert q.min() >= lo and q.max() <= hi
    err = (qz.dequantize(q, s, z, group) - w).abs()
    step = s.repeat_interleave(group or 64, dim=1)
    assert (err <= step / 2 + 1e-6).all()
    # values beyond the range clip to the end code
    q2, _, _ = qz.quantize_tensor(torch.cat([w, w * 0], 0), bits, group, sym)
    assert q2.max() <= hi


def test_int4_pack_roundtrip():
    q = torch.randint(-8, 8, (5, 32), dtype=torch.int8)
    p = qz.pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (5, 16)
    assert torch.equal(qz.unpack_int4(p), q)
    u = torch.randint(0, 16, (3, 8), dtype=torch.uint8)
    assert torch.equal(qz.unpack_int4(qz.pack_int4(u), signed=False), u)


def test_nf4_levels_and_roundtrip():
    v = qz.nf4_levels()
    torch.testing.assert_close(v, torch.tensor(BNB_NF4), atol=2e-6, rtol=0)
    assert v.min() == -1 and v.max() == 1 and (v == 0).sum() == 1
    w = torch.randn(32, 128)
    for dq in (False, True):
        back = qz.nf4_dequantize(qz.nf4_quantize(w, 64, double_quant=dq))
        rel = ((back - w).norm() / w.norm()).item()
        assert rel < 0.12, rel  # ~4-bit error on Gaussian weights


def test_qlora_trains_on_nf4_base(tiny):
    from llmkit.adapt.peft import apply_lora, merge_lora

    qz.nf4_model(tiny)
    apply_lora(tiny, r=4, alpha=8, targets="all")
    ids = torch.randint(4, 90, (4, 12))
    opt = torch.optim.AdamW([p for p in tiny.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(10):
        logits = tiny(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.15, losses
    assert all(not p.requires_grad for n, p in tiny.named_parameters() if "lora_" not in n)
    with torch.no_grad():
        out = tiny(ids)
        torch.testing.assert_close(merge_lora(tiny)(ids), out, atol=1e-4, rtol=1e-4)


def _correlated_inputs(n=512, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d ** 0.5
    return (torch.randn(n, d, generator=g) @ mix) * torch.linspace(0.2, 4, d)


@pytest.mark.parametrize("group", [None, 16])
def test_gptq_beats_rtn_on_calibration_batch(group):
    lin = torch.nn.Linear(64, 48)
    x = _correlated_inputs()
    store = {}
    h = lin.register_forward_pre_hook(ptq.hessian_hook(store, "l"))
    lin(x)
    h.remove()
    torch.testing.assert_close(store["l"][0], 2 * x.t() @ x / x.shape[0], atol=1e-4, rtol=1e-4)
    ref = lin(x)
    rtn = qz.rtn_linear(lin, 4, group, symmetric=False)
    gq = ptq.gptq_linear(lin, store["l"][0], 4, group, symmetric=False)
    e_rtn, e_gptq = ptq.mse(rtn(x), ref), ptq.mse(gq(x), ref)
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)
    assert gq.qweight.dtype == torch.uint8 and gq.qweight.shape == (48, 32)  # packed int4


def test_gptq_model_beats_rtn_model(tiny):
    calib = [torch.randint(4, 90, (4, 32)) for _ in range(2)]
    test = torch.randint(4, 90, (4, 32))
    with torch.no_grad():
        ref = tiny(test)
        e_rtn = ptq.mse(qz.quantize_model(copy.deepcopy(tiny), 4, 8, False)(test), ref)
        e_gptq = ptq.mse(ptq.gptq_model(copy.deepcopy(tiny), calib, 4, 8, False)(test), ref)
        e_int8 = ptq.mse(qz.quantize_model(copy.deepcopy(tiny), 8)(test), ref)
    assert e_gptq < e_rtn
    assert e_int8 < 0.05 * e_rtn  # "int8 ≈ fp, int4 worse" (survey §5.4.3)


def _with_outliers(model):
    """Give a few hidden channels a large scale (the emergent outlier features of LLM.int8()/SmoothQuant)."""
    with torch.no_grad():
        for blk in model.layers:
            blk.attn_norm.weight[[3, 17]] = 25.0
            blk.mlp_norm.weight[[5]] = 30.0
    return model


def test_smoothquant_exact_in_float_and_helps_w8a8(tiny):
    model = _with_outliers(tiny)
    calib = [torch.randint(4, 90, (4, 24))]
    x = torch.randint(4, 90, (3, 24))
    with torch.no_grad():
        ref = model(x)
        smoothed = copy.deepcopy(model)
        ptq.smooth_model(smoothed, ptq.act_absmax(smoothed, calib), alpha=0.5)
        torch.testing.assert_close(smoothed(x), ref, atol=1e-4, rtol=1e-4)
        e_plain = ptq.mse(ptq.w8a8_model(copy.deepcopy(model))(x), ref)
        e_smooth = ptq.mse(ptq.w8a8_model(smoothed)(x), ref)
    assert e_smooth < e_plain


def test_llm_int8_decomposition():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, generator=g)
    x[:, [7, 40]] *= 40  # outlier features
    W = torch.randn(32, 64, generator=g) * 0.05
    ref = x @ W.t()
    torch.testing.assert_close(ptq.int8_decomposed_matmul(x, W, threshold=0.0), ref, atol=1e-5, rtol=1e-5)
    e_dec = ptq.mse(ptq.int8_decomposed_matmul(x, W, threshold=6.0), ref)
    e_all = ptq.mse(ptq.int8_decomposed_matmul(x, W, threshold=float("inf")), ref)
    assert e_dec < 0.1 * e_all
    lin = torch.nn.Linear(64, 32)
    m = ptq.Int8Linear(lin)
    assert m.qweight.dtype == torch.int8
    assert ptq.mse(m(x), lin(x)) < 1e-3 * lin(x).pow(2).mean().item()


def test_qat_ste_gradients():
    x = torch.randn(6, 32, requires_grad=True)
    y = qz.fake_quant(x, 4, group_size=8)
    assert not torch.equal(y, x)
    (y * torch.arange(32.0)).sum().backward()
    torch.testing.assert_close(x.grad, torch.arange(32.0).expand(6, 32))  # identity backward
    lin = torch.nn.Linear(32, 16)
    fq = qz.FakeQuantLinear(lin, w_bits=4, a_bits=8)
    inp = torch.randn(5, 32)
    fq(inp).pow(2).sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    model = torch.nn.Sequential(torch.nn.Linear(32, 16))
    qz.prepare_qat(model, w_bits=4)
    before = model(inp)
    qz.convert_qat(model)
    assert isinstance(model[0], qz.QuantLinear)
    torch.testing.assert_close(model(inp), before, atol=1e-5, rtol=1e-5)
