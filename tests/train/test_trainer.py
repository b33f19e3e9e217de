"""Trainer: accumulation == one big batch, clipping, z-loss, precision, activation checkpointing, resume."""
import json

import pytest
import torch

from llmkit.model import ModelConfig, Transformer
from llmkit.train import checkpoint as ckpt
from llmkit.train.denoising import DenoisingLoader, special_vocab
from llmkit.train.objectives import lm_loss
from llmkit.train.trainer import Trainer, apply_activation_checkpointing
from tests.train.conftest import loaders, tiny_model, train_cfg


def _params(m):
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def test_accumulation_equals_one_big_batch():
    # 4 micro-batches of 2 with a ragged -100 mask == one batch of 8 (token-weighted), after an optimiser step
    big_loader, _ = loaders(8, 16)
    batch = next(big_loader)
    batch["labels"][0, :5] = -100
    batch["labels"][5, 3:] = -100
    micro = [{k: v[i:i + 2] for k, v in batch.items()} for i in range(0, 8, 2)]
    a, b = tiny_model(), tiny_model()
    # SGD for the step check: Adam's g/sqrt(v) turns 1e-9 gradient noise on ~0 entries into lr-sized moves
    ta = Trainer(a, train_cfg(micro_batch_size=2, batch_size=8, seq_len=16, grad_clip=0, optimizer="sgd"), iter(micro))
    tb = Trainer(b, train_cfg(micro_batch_size=8, seq_len=16, grad_clip=0, optimizer="sgd"), iter([batch]))
    la, _ = ta.train_step(micro)
    lb, _ = tb.train_step([batch])
    assert abs(la - lb) < 1e-6
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-6, msg=n)
    ta._apply()
    tb._apply()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)


def _clip_and_step(clip, optimizer="adamw", torch_path=False, monkeypatch=None):
    """One step of a tiny model: (raw grad norm, reported norm, grad norm after _clip, params after, params before);
    with Adam the parameters after are followed by its first moments (scale-sensitive, unlike Adam's first step)."""
    import llmkit.train.trainer as T

    if torch_path:  # torch.nn.utils.clip_grad_norm_ and a separate optimizer step: the reference
        monkeypatch.setattr(T, "fused_f32", lambda *t: None)
    torch.manual_seed(0)
    m = tiny_model()
    tr, _ = loaders(4, 16)
    t = Trainer(m, train_cfg(seq_len=16, grad_clip=clip, lr=1e-2, optimizer=optimizer), tr)
    before = _params(m)
    t.train_step([next(tr)])
    raw = float(torch.sqrt(sum(p.grad.pow(2).sum() for p in m.parameters())))
    reported = t._clip()
    after = float(torch.sqrt(sum(p.grad.pow(2).sum() for p in m.parameters())))
    t._apply()
    if torch_path:
        monkeypatch.undo()
    moments = {f"{n}.exp_avg": t.optimizer.state[p]["exp_avg"] for n, p in m.named_parameters()
               if "exp_avg" in t.optimizer.state.get(p, {})}
    return raw, reported, after, {**_params(m), **moments}, before


def test_global_norm_clipping(monkeypatch):
    """The reported norm is the one before clipping and the step equals torch's clip_grad_norm_ followed by the
    optimizer: the fused AdamW takes the factor in its own pass (grads untouched by `_clip`), others scale them."""
    from llmkit.model.layers import native_ext

    raw, reported, after, fast, before = _clip_and_step(0.05)
    assert raw > 0.05 and reported == pytest.approx(raw, rel=1e-5)
    if native_ext() is not None:  # the native norm pass: the factor is deferred to the fused AdamW
        assert after == pytest.approx(raw, rel=1e-6)
    else:  # no native kernels (LLMKIT_NATIVE=0, no compiler): torch's clip_grad_norm_ scaled them
        assert after == pytest.approx(0.05, rel=1e-4)
    raw_r, reported_r, after_r, ref, _ = _clip_and_step(0.05, torch_path=True, monkeypatch=monkeypatch)
    assert raw_r == raw and reported_r == pytest.approx(raw, rel=1e-5) and after_r == pytest.approx(0.05, rel=1e-4)
    assert max(float((fast[n] - before[n]).abs().max()) for n in before) > 1e-3  # the step moved the weights
    assert any(n.endswith(".exp_avg") for n in fast)
    for n in fast:
        torch.testing.assert_close(fast[n], ref[n], rtol=1e-5, atol=1e-7, msg=n)
    # an optimizer without the fused pass: the gradients are scaled in place
    raw, reported, after, _, _ = _clip_and_step(0.05, optimizer="sgd")
    assert reported == pytest.approx(raw, rel=1e-5) and after == pytest.approx(0.05, rel=1e-4)


def test_no_clipping_needed_leaves_step_bitwise(monkeypatch):
    """Below the threshold torch multiplies every gradient by 1.0; skipping that pass changes no bit."""
    raw, reported, after, fast, _ = _clip_and_step(1e6)
    assert after == raw
    ref = _clip_and_step(1e6, torch_path=True, monkeypatch=monkeypatch)[3]
    assert all(torch.equal(fast[n], ref[n]) for n in fast)


def test_z_loss_value():
    m = tiny_model()
    tr, _ = loaders(4, 16)
    b = next(tr)
    loss0, _ = lm_loss(m, b)
    loss1, met = lm_loss(m, b, z_loss=1e-2)
    with torch.no_grad():
        logits = m(b["input_ids"]).float()
    z = torch.logsumexp(logits, -1)
    assert float(met["z_loss"]) == pytest.approx(float(1e-2 * z.pow(2).mean()), rel=1e-5)
    assert float((loss1 - loss0).detach()) == pytest.approx(float(met["z_loss"]), rel=1e-5)


def test_bf16_autocast_on_cpu_trains():
    m = tiny_model()
    tr, va = loaders(4, 16)
    out = Trainer(m, train_cfg(seq_len=16, dtype="bf16", max_steps=4), tr, val_data=va).fit()
    assert torch.isfinite(torch.tensor(out["loss"])) and m.embed.weight.dtype == torch.float32  # fp32 master weights


def _run(dtype="fp32", out_dir=None, overflow_at=(), resume=False, arch="llama", **kw):
    """A tiny 6-step run and the Trainer's records. fp16 runs autocast float16 with torch's GradScaler (on CPU as
    on CUDA); the embedding's gradient is made inf in the backward of the steps listed in `overflow_at`
    (counted from 1, as in metrics.jsonl). `arch="gpt2"`: the GPT-2 preset's blocks (LayerNorm with biases,
    GELU, learned positions, tied head), at the tiny size. `arch="glm"`: GLM blank infilling with 2D positions
    and [gMASK] rows (prefix masks, position and block-position ids in every batch)."""
    tr, _ = loaders(4, 16)
    if arch == "gpt2":
        torch.manual_seed(0)
        m = Transformer(ModelConfig.preset("gpt2", vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=128))
    elif arch == "glm":
        m = tiny_model(vocab_size=special_vocab(64, 8), block_pos=True)
        tr = DenoisingLoader(tr, "glm", 64, n_sentinels=8, seed=0, glm_gmask_prob=0.3)
    else:
        m = tiny_model()
    t = Trainer(m, train_cfg(seq_len=16, dtype=dtype, **{"max_steps": 6, **kw}), tr, out_dir=out_dir)
    m.embed.weight.register_hook(lambda g: torch.full_like(g, float("inf")) if t.step + 1 in overflow_at else g)
    recs = []
    t.hooks.append(lambda _, rec: recs.append(rec))
    t.fit(resume=resume)
    return t, recs


def _losses(recs):
    return [r["loss"] for r in recs]


def test_fp16_on_cpu_follows_fp32():
    # fp16 autocast with dynamic loss scaling (F5) runs on CPU too: losses track fp32, the scale stays put
    _, r16 = _run("fp16")
    _, r32 = _run()
    assert _losses(r16) == pytest.approx(_losses(r32), rel=2e-3)
    # clipping saw the unscaled gradients: the norm is fp32's, not 65536 times it
    assert [r["grad_norm"] for r in r16] == pytest.approx([r["grad_norm"] for r in r32], rel=2e-2)
    assert [r["loss_scale"] for r in r16] == [2.0 ** 16] * 6 and not any(r["skipped"] for r in r16)
    assert r16[-1]["loss"] < r16[0]["loss"]


def test_fp16_overflow_skips_the_step_and_halves_the_scale(tmp_path):
    t, recs = _run("fp16", tmp_path, overflow_at=(3, 4), max_steps=6, loss_scale_init=1024.0,
                        loss_scale_growth_interval=2, ckpt_every=2)
    assert [r["loss_scale"] for r in recs] == [1024.0, 2048.0, 1024.0, 512.0, 512.0, 1024.0]
    assert [r["skipped"] for r in recs] == [False, False, True, True, False, False]
    assert all(torch.isfinite(p).all() for p in t.raw_model.parameters())
    # metrics.jsonl stays strict JSON: the overflowed steps' inf grad norm is written as "inf"
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[2])["grad_norm"] == "inf" and "Infinity" not in "".join(lines)
    from llmkit.train.metrics import read_metrics
    assert read_metrics(tmp_path)[2]["grad_norm"] == float("inf")
    # a skipped step leaves the parameters and AdamW's state exactly as they were
    a, _ = _run("fp16", overflow_at=(3,), max_steps=3, loss_scale_init=1024.0)
    b, _ = _run("fp16", max_steps=2, loss_scale_init=1024.0)
    for (n, p), q in zip(a.raw_model.named_parameters(), b.raw_model.parameters()):
        assert torch.equal(p, q), n
        sa, sb = a.optimizer.state[p], b.optimizer.state[q]
        assert all(torch.equal(sa[k], sb[k]) for k in ("exp_avg", "exp_avg_sq", "step")), n


def test_fp16_resume_restores_the_loss_scale(tmp_path):
    # the scaler's scale and growth tracker travel in the checkpoint: a resumed run takes the same steps
    kw = dict(overflow_at=(2,), max_steps=7, loss_scale_init=1024.0, loss_scale_growth_interval=3, ckpt_every=3)
    _, full = _run("fp16", tmp_path / "a", **kw)
    _run("fp16", tmp_path / "b", **{**kw, "max_steps": 3})  # stops at step 3 (its checkpoint; growth tracker 1)
    _, rest = _run("fp16", tmp_path / "b", resume=True, **kw)
    assert [(r["loss"], r["loss_scale"]) for r in rest] == [(r["loss"], r["loss_scale"]) for r in full[3:]]
    assert [r["loss_scale"] for r in full] == [1024.0, 512.0, 512.0, 512.0, 1024.0, 1024.0, 1024.0]


def test_grad_scaler_skips_inf_and_halves_scale():
    # the dynamic loss scaler used for fp16 (F5); its CPU build behaves as on CUDA
    w = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([w], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale((w * float("inf")).sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(w.detach(), torch.ones(4)) and scaler.get_scale() == 512.0


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_cuda_training_follows_cpu_fp32(dtype):
    # fp32 runs TF32 matmuls on CUDA; six steps move the loss by far more than these tolerances
    _, ref = _run()
    t, got = _run(dtype, device="cuda")
    assert all(p.device.type == "cuda" for p in t.raw_model.parameters())
    assert _losses(got) == pytest.approx(_losses(ref), rel=2e-2)
    assert got[-1]["loss"] < got[0]["loss"]


@pytest.mark.parametrize("device, dtype", [("cpu", "bf16"), pytest.param("cuda", "fp32", marks=needs_cuda),
                                           pytest.param("cuda", "bf16", marks=needs_cuda)])
def test_glm_training_follows_cpu_fp32(device, dtype):
    # the prefix-masked attention (SDPA with a mask: the memory-efficient kernel on CUDA), positions and block
    # positions of GLM batches, under bf16 autocast on the CPU and on CUDA (where fp32 runs TF32 matmuls)
    _, ref = _run(arch="glm")
    _, got = _run(dtype, device=device, arch="glm")
    assert _losses(got) == pytest.approx(_losses(ref), rel=2e-2)
    assert got[-1]["loss"] < got[0]["loss"]


@needs_cuda
def test_cuda_fp16_overflow_skip_and_resume(tmp_path):
    t, recs = _run("fp16", overflow_at=(3, 4), max_steps=6, loss_scale_init=1024.0, loss_scale_growth_interval=2,
                        device="cuda")
    assert [r["loss_scale"] for r in recs] == [1024.0, 2048.0, 1024.0, 512.0, 512.0, 1024.0]
    assert all(torch.isfinite(p).all() for p in t.raw_model.parameters())
    kw = dict(overflow_at=(2,), max_steps=7, loss_scale_init=1024.0, loss_scale_growth_interval=3, ckpt_every=3,
              device="cuda")
    _, full = _run("fp16", tmp_path / "a", **kw)
    _run("fp16", tmp_path / "b", **{**kw, "max_steps": 3})
    _, rest = _run("fp16", tmp_path / "b", resume=True, **kw)
    assert [r["loss_scale"] for r in rest] == [r["loss_scale"] for r in full[3:]]
    assert _losses(rest) == pytest.approx(_losses(full[3:]), rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_compiled_training_follows_eager_on_cpu(dtype, arch):
    # TrainConfig.compile on the CPU paths (the training Functions of RMSNorm and RoPE, the bf16 attention Function)
    _, eager = _run(dtype, arch=arch)
    _, compiled = _run(dtype, compile=True, arch=arch)
    _same_training(compiled, eager, rel=1e-5 if dtype == "fp32" else 2e-2)


def _same_training(got, ref, rel):
    """Same losses and same gradient norms, step by step. The norms are the sharp half: under torch 2.11's
    compile (the GPU machine's) a Function returning a no-op cast got all-zero gradients, and six steps of
    losses moved only a few percent apart."""
    assert _losses(got) == pytest.approx(_losses(ref), rel=rel)
    assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in ref], rel=max(rel, 1e-4))


@needs_cuda
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cuda_compiled_bf16_step_follows_eager(arch):
    _, eager = _run("bf16", device="cuda", arch=arch)
    _, compiled = _run("bf16", device="cuda", compile=True, arch=arch)
    _same_training(compiled, eager, rel=2e-2)


def test_activation_checkpointing_same_gradients():
    a, b = tiny_model(), tiny_model()
    assert apply_activation_checkpointing(b) == 2
    tr, _ = loaders(4, 16)
    batch = next(tr)
    lm_loss(a, batch)[0].backward()
    lm_loss(b, batch)[0].backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=n)


def test_resume_in_process_is_bitwise(tmp_path):
    cfg = train_cfg(max_steps=8, ckpt_every=4, keep_last=2, seq_len=16)
    tr, _ = loaders(4, 16)
    full = Trainer(tiny_model(), cfg, tr, out_dir=tmp_path / "a")
    full.fit()
    ref = [r["loss"] for r in map(json.loads, (tmp_path / "a/metrics.jsonl").read_text().splitlines())]
    # run to step 4 only (its checkpoint), then a fresh process-like trainer resumes to 8
    tr, _ = loaders(4, 16)
    Trainer(tiny_model(), train_cfg(max_steps=8, ckpt_every=4, seq_len=16), tr, out_dir=tmp_path / "b").fit()
    for p in ckpt.list_checkpoints(tmp_path / "b/checkpoints"):
        if p.name != ckpt.ckpt_name(4):
            import shutil
            shutil.rmtree(p)
    lines = (tmp_path / "b/metrics.jsonl").read_text().splitlines()
    torch.manual_seed(123)  # a different global RNG: resume must restore it
    tr, _ = loaders(4, 16, seed=0)
    Trainer(tiny_model(seed=5), cfg, tr, out_dir=tmp_path / "b").fit(resume=True)
    got = [r["loss"] for r in map(json.loads, (tmp_path / "b/metrics.jsonl").read_text().splitlines())]
    assert len(lines) == 8 and got == ref


def test_checkpoint_layout_atomic_and_keep_last(tmp_path):
    tr, _ = loaders(4, 16)
    t = Trainer(tiny_model(), train_cfg(max_steps=6, ckpt_every=2, keep_last=2, seq_len=16), tr, out_dir=tmp_path)
    t.fit()
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")]
    assert names == [ckpt.ckpt_name(4), ckpt.ckpt_name(6)]
    last = tmp_path / "checkpoints" / ckpt.ckpt_name(6)
    for f in ("config.json", "model.safetensors", "manifest.json", "optimizer.safetensors", "rng.safetensors",
              "trainer_state.json"):
        assert (last / f).exists(), f
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    # a damaged newest checkpoint is skipped in favour of the previous one
    with open(last / "model.safetensors", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02")
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints").name == ckpt.ckpt_name(4)


def test_trainable_subset_leaves_others_frozen():
    m = tiny_model()
    before = _params(m)
    tr, _ = loaders(4, 16)
    Trainer(m, train_cfg(max_steps=2, seq_len=16), tr, params=[m.layers[0].mlp.up.weight]).fit()
    changed = {n for n, p in m.named_parameters() if not torch.equal(before[n], p)}
    assert changed == {"layers.0.mlp.up.weight"}
