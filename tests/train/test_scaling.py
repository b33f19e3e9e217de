"""Scaling-law machinery (survey §2.1): exact FLOP counts against torch's FLOP counter, law fits, optimum."""
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from llmkit.model import ModelConfig, Transformer
from llmkit.train.scaling import (Chinchilla, Kaplan, attention_pairs, fit_chinchilla, fit_kaplan, forward_flops,
                                  training_flops)


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_heads=1, activation="gelu"), dict(sliding_window=5, tie_embeddings=True)])
def test_flops_equal_torch_flop_counter(kw):
    # the soft-capped attention path multiplies explicitly, so torch's counter sees every product (dense T x T)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, attn_softcap=1e4, **kw)
    m = Transformer(cfg)
    ids = torch.randint(0, 64, (3, 12))
    with FlopCounterMode(display=False) as fc:
        m(ids)
    assert fc.get_total_flops() == 3 * forward_flops(cfg, 12, causal_exact=False)
    with FlopCounterMode(display=False) as fc:
        m(ids).sum().backward()
    assert fc.get_total_flops() == pytest.approx(3 * 3 * forward_flops(cfg, 12, causal_exact=False), rel=0.02)
    assert training_flops(cfg, 120, 12) == 3 * forward_flops(cfg, 12) * 10


def test_attention_pairs_causal_and_window():
    assert attention_pairs(4) == 10 and attention_pairs(4, causal=False) == 16
    mask = torch.ones(10, 10).tril() * torch.ones(10, 10).triu(-2)  # window 3
    assert attention_pairs(10, 3) == int(mask.sum())


def test_chinchilla_fit_recovers_known_law():
    true = Chinchilla(E=1.7, A=400.0, B=410.0, alpha=0.34, beta=0.28)
    g = torch.Generator().manual_seed(0)
    N, D, L = [], [], []
    for n in (1e5, 3e5, 1e6, 3e6):
        for d in (1e6, 3e6, 1e7, 3e7):
            N.append(n); D.append(d)
            L.append(true.loss(n, d) * (1 + 0.002 * torch.randn(1, generator=g).item()))
    fit = fit_chinchilla(N, D, L)
    # prediction 16x beyond the largest run
    assert fit.loss(1e7, 1e8) == pytest.approx(true.loss(1e7, 1e8), rel=0.02)
    n_opt, d_opt = fit.compute_optimal(1e19)
    assert 6 * n_opt * d_opt == pytest.approx(1e19, rel=1e-6)
    # the optimum is a minimum of the loss along the iso-compute curve
    for s in (0.5, 2.0):
        assert fit.loss(n_opt, d_opt) <= fit.loss(n_opt * s, d_opt / s)


def test_kaplan_fit_recovers_known_law():
    true = Kaplan(Nc=8.8e6, Dc=5.4e6, alpha_N=0.076, alpha_D=0.095)
    N = [n for n in (1e5, 3e5, 1e6, 3e6) for _ in range(4)]
    D = [d for _ in range(4) for d in (1e6, 3e6, 1e7, 3e7)]
    L = [true.loss(n, d) for n, d in zip(N, D)]
    fit = fit_kaplan(N, D, L)
    assert fit.loss(1e7, 1e8) == pytest.approx(true.loss(1e7, 1e8), rel=0.01)
    assert math.isfinite(fit.alpha_N)


def test_scaling_cli_trains_a_ladder_and_fits(tmp_path):
    """`llmkit scaling` end to end on a tiny ladder: real runs through the Trainer, fits, plot, resume."""
    import json

    from llmkit.train.scaling_cli import main

    text = ("the quick brown fox jumps over the lazy dog. " * 400) + ("pack my box with five dozen liquor jugs. " * 400)
    data = tmp_path / "corpus.txt"
    data.write_text(text)
    out = tmp_path / "ladder"
    args = ["--data", str(data), "--out", str(out), "--widths", "16,32", "--tokens", "4e3,8e3", "--seq-len", "32",
            "--batch", "8", "--eval-batches", "2", "--budget", "1e12"]
    assert main(args) == 0
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert len(runs) == 4 and all(r["loss"] < 4.0 for r in runs)  # below ln(vocab) after training
    big = [r for r in runs if r["width"] == 32]
    assert big[1]["loss"] < big[0]["loss"] + 0.05  # more tokens, no worse
    fit = json.loads((out / "fit.json").read_text())
    assert fit["n_runs"] == 4 and fit["compute_optimal"]["N"] > 0
    assert (out / "scaling.png").stat().st_size > 1000 and (out / "manifest.json").exists()
    # a second invocation resumes: nothing is retrained
    mtime = (out / "runs.jsonl").stat().st_mtime_ns
    assert main(args) == 0 and (out / "runs.jsonl").stat().st_mtime_ns == mtime
    assert main(["--runs", str(out / "runs.jsonl"), "--out", str(tmp_path / "refit")]) == 0


@pytest.mark.parametrize("kw", [dict(arch="encoder_decoder", n_encoder_layers=3, pos="t5"),
                                dict(n_experts=4, moe_top_k=2, moe_capacity_factor=None)])
def test_step_flops_equal_torch_flop_counter(kw):
    """The Trainer's MFU numerator (`metrics.batch_flops`) against torch's counter: an encoder-decoder reading 20
    encoder and 9 decoder positions (its encoder's weights per encoder position, cross-attention over all 20),
    and an MoE model (only the routed experts' weights count). Soft-capping makes every attention product explicit,
    so the counter sees them all (the dense count)."""
    from llmkit.train.metrics import batch_flops, step_flops

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, attn_softcap=1e4, **kw)
    torch.manual_seed(0)
    m = Transformer(cfg)
    batch = {"input_ids": torch.randint(0, 64, (3, 9))}
    if cfg.arch == "encoder_decoder":
        batch["encoder_input_ids"] = torch.randint(0, 64, (3, 20))
    kw_in = {k: v for k, v in batch.items() if k != "input_ids"}
    dense = step_flops(cfg, 27, 9, 60 if kw_in else 0, 20 if kw_in else 0, causal_exact=False)
    with FlopCounterMode(display=False) as fc:
        m(batch["input_ids"], **kw_in)
    assert fc.get_total_flops() == dense / 3  # (MoE: each expert runs on the tokens routed to it, top_k per token)
    # the Trainer's count: the decoder's causal self-attention at half its keys, everything else whole
    half = 3 * 27 * cfg.n_layers * 4 * cfg.n_heads * cfg.head_dim * 9 / 2
    assert batch_flops(cfg, batch) == dense - half
