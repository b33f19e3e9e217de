"""Bench: pre-training speed of llmkit (issue 6, Speed; survey §4.3).

(a) time to quality on char-level Tiny Shakespeare (../shared/data/tinyshakespeare, first 90% train, last 10% val).
    Peer: nanoGPT's CPU recipe run as nanoGPT's own model/training code runs it (GPT with LayerNorm, learned
    positions, GELU MLP, tied embeddings, no biases; AdamW lr 1e-3, beta2 0.99, wd 0.1 on >=2-D params,
    warm-up 100, cosine to 1e-4 at 2000 iters, clip 1.0, fp32 on CPU; batch 12 x block 64; eval every 250
    iters with 20 batches of train and val). Llmkit: the shipped recipe `llmkit/recipes/shakespeare-char.yaml`
    trained by `llmkit.train.Trainer`. Both are timed end to end (training + their own evaluations), and
    both final models are then scored by one common, untimed evaluator: the mean loss over every
    non-overlapping window of the val split at the model's own block size.
    Target: llmkit reaches val loss <= 1.88 in <= 50% of the peer's wall time.
(b) throughput: tokens/s and MFU of a ~20M-parameter Llama-style model, llmkit `Transformer` + `Trainer`
    step vs transformers' `LlamaForCausalLM` (same config, AdamW, batch), fp32 and bf16 autocast. MFU is
    against the measured matmul peak of this machine (llmkit.train.metrics.measured_peak_flops).
(c) GPU MFU (run it where a CUDA GPU is present; not part of the default run): GPT-2-124M (the `gpt2` preset, the
    model of llmkit/recipes/gpt2-124m.yaml) trained by `Trainer` on random tokens in bf16 autocast with
    torch.compile, micro-batches of 32 (the recipe's) and 64 sequences x 1024 tokens (one run each; torch.compile's
    caches are reset in between so each size gets static shapes), vocabulary padded to 50304
    like nanoGPT's and llm.c's runs. MFU is reported against the GPU's nominal dense bf16 peak (989 TFLOP/s for
    H100/H200 SXM) and against a measured 8192^3 bf16 matmul. Target: >= 45% on an H100/H200-class GPU.
    After each size, torch.profiler's table of 3 more steps by kernel time says where the step goes.
    `bench/gpu_check.sh` runs it after the CUDA tests. `--gpu-device cpu --gpu-layers 2 --gpu-seq 64 --gpu-batch 2
    --no-compile` runs the same code as a smoke test.
Usage: .venv/bin/python bench/pretrain.py [--only quality|throughput|gpu] [--threads 2]
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("LLMKIT_SHARED_DATA", REPO.parent / "shared" / "data"))
TEXT = SHARED / "tinyshakespeare" / "input.txt"


# ---------------------------------------------------------------------------------------------- the peer: nanoGPT
class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, bias):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.n_head, self.n_embd = n_head, n_embd

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class LayerNorm(nn.Module):
    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class Block(nn.Module):
    def __init__(self, n_embd, n_head, bias):
        super().__init__()
        self.ln_1, self.attn = LayerNorm(n_embd, bias), CausalSelfAttention(n_embd, n_head, bias)
        self.ln_2 = LayerNorm(n_embd, bias)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd, bias=bias), nn.GELU(), nn.Linear(4 * n_embd, n_embd, bias=bias))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """nanoGPT's model.py (Karpathy), condensed: the same modules, init and weight tying."""

    def __init__(self, vocab_size, block_size, n_layer, n_head, n_embd, bias=False):
        super().__init__()
        self.block_size = block_size
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList(Block(n_embd, n_head, bias) for _ in range(n_layer))
        self.ln_f = LayerNorm(n_embd, bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("mlp.2.weight") or pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            torch.nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            torch.nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        t = idx.size(1)
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for blk in self.h:
            x = blk(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

    def configure_optimizers(self, weight_decay, learning_rate, betas):
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)  # fused only on CUDA in nanoGPT


def nanogpt_cpu_run(train_ids: np.ndarray, val_ids: np.ndarray, vocab: int, seed: int = 1337):
    """nanoGPT train.py with config/train_shakespeare_char.py and the README's CPU overrides."""
    batch_size, block_size, max_iters, eval_interval, eval_iters = 12, 64, 2000, 250, 20
    lr, min_lr, warmup, decay_iters = 1e-3, 1e-4, 100, 2000
    torch.manual_seed(seed)
    model = GPT(vocab, block_size, n_layer=4, n_head=4, n_embd=128)
    opt = model.configure_optimizers(0.1, lr, (0.9, 0.99))
    train_t, val_t = torch.from_numpy(train_ids.astype(np.int64)), torch.from_numpy(val_ids.astype(np.int64))

    def get_batch(split):
        data = train_t if split == "train" else val_t
        ix = torch.randint(len(data) - block_size, (batch_size,))
        return (torch.stack([data[i:i + block_size] for i in ix]), torch.stack([data[i + 1:i + 1 + block_size] for i in ix]))

    @torch.no_grad()
    def estimate_loss():
        out = {}
        model.eval()
        for split in ("train", "val"):
            out[split] = torch.stack([model(*get_batch(split))[1] for _ in range(eval_iters)]).mean().item()
        model.train()
        return out

    def get_lr(it):
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        if it > decay_iters:
            return min_lr
        ratio = (it - warmup) / (decay_iters - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)

    t0, c0 = time.perf_counter(), time.process_time()
    X, Y = get_batch("train")
    last_val = float("nan")
    for it in range(max_iters + 1):
        for g in opt.param_groups:
            g["lr"] = get_lr(it)
        if it % eval_interval == 0:
            last_val = estimate_loss()["val"]
        if it == max_iters:
            break
        _, loss = model(X, Y)
        X, Y = get_batch("train")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, time.perf_counter() - t0, time.process_time() - c0, last_val


@torch.no_grad()
def full_val_loss(forward, val_ids: np.ndarray, block: int, batch: int = 64) -> float:
    """Mean next-token loss over every non-overlapping window of the val split (the common, untimed judge)."""
    ids = torch.from_numpy(val_ids.astype(np.int64))
    n = (len(ids) - 1) // block
    x = ids[: n * block].view(n, block)
    y = ids[1: n * block + 1].view(n, block)
    tot = 0.0
    for i in range(0, n, batch):
        logits = forward(x[i:i + batch]).float()
        tot += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y[i:i + batch].reshape(-1), reduction="sum").item()
    return tot / (n * block)


# ---------------------------------------------------------------------------------------------- (a) time to quality
def quality(args) -> dict:
    from llmkit.train.cli import build_run
    from llmkit.train.config import load_recipe

    text = TEXT.read_text()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = int(0.9 * len(ids))
    train_ids, val_ids = ids[:n], ids[n:]
    res = {}
    if not args.skip_peer:
        model, wall, cpu, val20 = nanogpt_cpu_run(train_ids, val_ids, len(chars))
        model.eval()
        res["peer"] = {"wall_s": wall, "cpu_s": cpu, "val_loss_nanogpt_eval": val20,
                       "val_loss": full_val_loss(lambda x: model(x)[0], val_ids, 64)}
        print(f"peer nanoGPT CPU recipe: {wall:.1f}s wall, {cpu:.1f}s CPU, its val {val20:.4f}, full val {res['peer']['val_loss']:.4f}", flush=True)
    import tempfile

    recipe = load_recipe(args.recipe, [f"data.path={TEXT}", "train.progress=false", "train.tensorboard=false",
                                       *args.override])
    with tempfile.TemporaryDirectory() as out:
        trainer, tok = build_run(recipe, Path(out))
        t0, c0 = time.perf_counter(), time.process_time()
        final = trainer.fit(resume=False)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    m = trainer.raw_model.eval()
    # llmkit's char tokenizer sorts the same characters (plus an EOS id after them): the ids agree with the peer's
    assert tok.encode(text[:2000]) == [stoi[c] for c in text[:2000]]
    full = full_val_loss(lambda x: m(x), val_ids, trainer.cfg.seq_len)
    res["llmkit"] = {"wall_s": wall, "cpu_s": cpu, "val_loss_trainer_eval": final.get("val_loss"), "val_loss": full,
                     "recipe": recipe.path, "params": trainer.model_config.num_params()}
    print(f"llmkit {Path(recipe.path).name}: {wall:.1f}s wall, {cpu:.1f}s CPU, full val {full:.4f} "
          f"({trainer.model_config.num_params() / 1e6:.2f}M params)", flush=True)
    if "peer" in res:
        ratio = wall / res["peer"]["wall_s"]
        cpu_ratio = cpu / res["peer"]["cpu_s"]  # robust to other processes on a shared machine
        ok = full <= 1.88 and ratio <= 0.5
        print(f"wall-time ratio llmkit/peer = {ratio:.2f} (target <= 0.50; CPU-time ratio {cpu_ratio:.2f}), "
              f"llmkit val {full:.4f} (target <= 1.88): {'MET' if ok else 'NOT MET'}", flush=True)
        res["ratio"], res["cpu_ratio"] = ratio, cpu_ratio
    return res


# ---------------------------------------------------------------------------------------------- (b) throughput
def throughput(args) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmkit.model.config import ModelConfig
    from llmkit.model.transformer import Transformer
    from llmkit.train.config import TrainConfig
    from llmkit.train.metrics import flops_per_token, measured_peak_flops
    from llmkit.train.trainer import Trainer

    d, L, H, V, T, B = 384, 8, 6, 8192, 256, args.batch  # ~20M parameters (14.2M non-embedding + 2 x 3.1M embeddings)
    mcfg = ModelConfig(vocab_size=V, d_model=d, n_layers=L, n_heads=H, d_ff=1024, max_seq_len=T, pos="rope",
                       norm="rmsnorm", activation="swiglu", norm_eps=1e-5)
    hcfg = LlamaConfig(vocab_size=V, hidden_size=d, num_hidden_layers=L, num_attention_heads=H,
                       num_key_value_heads=H, intermediate_size=1024, max_position_embeddings=T, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, attn_implementation="sdpa")
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, V, (B, T + 1), generator=g) for _ in range(4)]
    fpt = flops_per_token(mcfg, T)
    out = {"params": mcfg.num_params(), "flops_per_token": fpt, "loadavg_start": os.getloadavg()[0]}
    print(f"throughput: B={B} T={T} d={d} L={L} V={V}, {args.threads} thread(s), load average {os.getloadavg()[0]:.2f}")
    for dtype in args.dtypes.split(","):
        peak = measured_peak_flops(dtype, "cpu", seconds=1.0)
        ac = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bf16" else None

        torch.manual_seed(0)
        hf = LlamaForCausalLM(hcfg)
        hopt = torch.optim.AdamW(hf.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)

        def hf_step(i):
            b = batches[i % 4]
            ctx = ac() if ac else torch.autocast("cpu", enabled=False)
            with ctx:
                loss = F.cross_entropy(hf(input_ids=b[:, :-1]).logits.float().reshape(-1, V), b[:, 1:].reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
            hopt.step()
            hopt.zero_grad(set_to_none=True)

        torch.manual_seed(0)
        model = Transformer(mcfg)
        cfg = TrainConfig(max_steps=10**6, micro_batch_size=B, seq_len=T, lr=3e-4, dtype=dtype, progress=False,
                          tensorboard=False, warmup_steps=1, compile=args.compile)
        tr = Trainer(model, cfg, iter(()))

        def lk_step(i):
            b = batches[i % 4]
            tr.train_step([{"input_ids": b[:, :-1], "labels": b[:, 1:]}])
            tr._clip()
            tr._apply()

        rates, cpu_rates, rounds = {}, {}, {"transformers": [], "llmkit": []}
        for name, step in (("transformers", hf_step), ("llmkit", lk_step)) * args.rounds:
            for i in range(args.warmup):
                step(i)
            t0, c0 = time.perf_counter(), time.process_time()
            for i in range(args.steps):
                step(i)
            tps = args.steps * B * T / (time.perf_counter() - t0)
            if args.verbose:
                print(f"  {dtype} {name}: {tps:.0f} tok/s", flush=True)
            rates[name] = max(rates.get(name, 0.0), tps)  # best of the interleaved rounds (shared machine)
            rounds[name].append(tps)
            # tokens per CPU-second per thread: robust to other processes taking the cores
            cps = args.steps * B * T / (time.process_time() - c0) * args.threads
            cpu_rates[name] = max(cpu_rates.get(name, 0.0), cps)
        for name, tps in rates.items():
            print(f"{dtype} {name:12s}: {tps:8.0f} tok/s wall, {cpu_rates[name]:8.0f} tok/CPU-s x threads, "
                  f"MFU {tps * fpt / peak:5.1%} (peak {peak / 1e9:.0f} GFLOP/s)")
        ratio = rates["llmkit"] / rates["transformers"]
        cpu_ratio = cpu_rates["llmkit"] / cpu_rates["transformers"]
        # each llmkit round against the transformers round just before it: both saw nearly the same machine
        pairs = [lk / hf for hf, lk in zip(rounds["transformers"], rounds["llmkit"])]
        pair_median = statistics.median(pairs)
        print(f"{dtype} llmkit/transformers = {ratio:.2f}x wall (best rounds), {cpu_ratio:.2f}x CPU time, "
              f"{pair_median:.2f}x median of the {len(pairs)} round pairs (target >= 1.3x)", flush=True)
        # the ceiling on this host: the peer's MFU against the measured matmul peak bounds every ratio
        print(f"{dtype} 1.3x here needs llmkit at {1.3 * rates['transformers'] * fpt / peak:.0%} of the measured peak "
              f"(transformers {rates['transformers'] * fpt / peak:.0%}, llmkit {rates['llmkit'] * fpt / peak:.0%})",
              flush=True)
        print(f"{dtype} done, load average {os.getloadavg()[0]:.2f}", flush=True)
        out[dtype] = {"peak_flops": peak, **{f"{k}_tok_s": v for k, v in rates.items()},
                      **{f"{k}_mfu": v * fpt / peak for k, v in rates.items()}, "ratio": ratio, "cpu_ratio": cpu_ratio,
                      "pair_median_ratio": pair_median}
    return out


# ---------------------------------------------------------------------------------------------- (c) GPU MFU
NOMINAL_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12, "A100": 312e12, "A800": 312e12,
                "L40S": 362e12, "B200": 2250e12}  # dense bf16 tensor-core peaks (SXM parts), FLOP/s


def gpu(args) -> list[dict]:
    from llmkit.model.config import ModelConfig
    from llmkit.model.transformer import Transformer
    from llmkit.train.config import TrainConfig
    from llmkit.train.metrics import flops_per_token, measured_peak_flops
    from llmkit.train.trainer import Trainer

    dev = args.gpu_device
    cuda = dev.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("(c) needs a CUDA GPU (or --gpu-device cpu for the smoke run)")
    T = args.gpu_seq
    over = {"max_seq_len": max(T, 1024), "vocab_size": args.gpu_vocab}
    if args.gpu_layers:
        over["n_layers"] = args.gpu_layers
    mcfg = ModelConfig.preset("gpt2", **over)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    nominal = next((v for k, v in NOMINAL_BF16.items() if k in name), None)
    measured = measured_peak_flops("bf16", dev)
    fpt = flops_per_token(mcfg, T)
    print(f"gpu: {name}, GPT-2 preset ({mcfg.n_layers} layers, {mcfg.num_params() / 1e6:.0f}M params), T={T}, bf16, "
          f"compile={not args.no_compile}; measured bf16 matmul peak {measured / 1e12:.1f} TFLOP/s"
          + (f", nominal {nominal / 1e12:.0f}" if nominal else ""), flush=True)
    results = []
    for B in (int(b) for b in str(args.gpu_batch).split(",")):
        torch._dynamo.reset()  # a fresh compile per size: static shapes, not a dynamic-batch recompile
        torch.manual_seed(0)
        cfg = TrainConfig(max_steps=10**6, micro_batch_size=B, seq_len=T, lr=6e-4, betas=(0.9, 0.95),
                          weight_decay=0.1, dtype="bf16", compile=not args.no_compile, device=dev, progress=False,
                          tensorboard=False, warmup_steps=1)
        tr = Trainer(Transformer(mcfg), cfg, iter(()))
        g = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, mcfg.vocab_size, (B, T + 1), generator=g).to(dev) for _ in range(2)]

        def step(i):  # what Trainer.fit does per step, without the data loader
            b = batches[i % 2]
            tr.train_step([{"input_ids": b[:, :-1], "labels": b[:, 1:]}])
            tr._clip()
            tr._apply()

        t0 = time.perf_counter()
        for i in range(args.gpu_warmup):  # includes torch.compile's first traces
            step(i)
        sync()
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(args.gpu_steps):
            step(i)
        sync()
        dt = (time.perf_counter() - t0) / args.gpu_steps
        tps = B * T / dt
        out = {"device": name, "batch": B, "params": mcfg.num_params(), "tok_s": tps, "step_ms": 1e3 * dt,
               "flops_per_token": fpt, "mfu_measured": tps * fpt / measured,
               "mfu_nominal": tps * fpt / nominal if nominal else None, "warmup_s": warm,
               "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
        print(f"gpu: B={B}: {tps:,.0f} tok/s ({1e3 * dt:.1f} ms/step, warm-up {warm:.0f} s), MFU "
              f"{out['mfu_measured']:.1%} of the measured peak" + (f", {out['mfu_nominal']:.1%} of the nominal "
                                                                 f"(target >= 45%)" if nominal else "")
              + (f"; peak memory {out['peak_mem_gib']:.1f} GiB" if cuda else ""), flush=True)
        results.append(out)
        if args.gpu_profile:
            try:
                print(_profile_table(step, args.gpu_profile, cuda), flush=True)
            except Exception as e:  # a profiler that cannot start here must not cost the measurements
                print(f"gpu: no profile ({type(e).__name__}: {e})", flush=True)
        del tr, batches
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    return results


def _profile_table(step, n: int, cuda: bool, rows: int = 25) -> str:
    """Where a step's time goes: torch.profiler over `n` steps after the timed ones, the kernels by device time
    (CPU ops on the smoke run), so one GPU run that misses its MFU target also says what to work on."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for i in range(n):
            step(i)
        if cuda:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return f"gpu: profile of {n} steps, by {key}:\n" + prof.key_averages().table(sort_by=key, row_limit=rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["quality", "throughput", "gpu"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recipe", default="shakespeare-char")
    ap.add_argument("--skip-peer", action="store_true", help="(a): run only the llmkit recipe (tuning)")
    ap.add_argument("--override", nargs="*", default=[], help="(a): recipe overrides key=value")
    ap.add_argument("--steps", type=int, default=6, help="(b): timed steps per round")
    ap.add_argument("--batch", type=int, default=8, help="(b): sequences of 256 tokens per step")
    ap.add_argument("--warmup", type=int, default=2, help="(b): untimed steps per round")
    ap.add_argument("--compile", action="store_true", help="(b): torch.compile the llmkit model")
    ap.add_argument("--verbose", action="store_true", help="(b): print every round")
    ap.add_argument("--rounds", type=int, default=2, help="(b): interleaved rounds per engine (best is kept)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="(b): comma-separated, of fp32 and bf16")
    ap.add_argument("--gpu-device", default="cuda", help="(c): the device (cpu for a smoke run)")
    ap.add_argument("--gpu-batch", default="32,64", help="(c): sequences per step, comma-separated (one run each)")
    ap.add_argument("--gpu-seq", type=int, default=1024, help="(c): tokens per sequence")
    ap.add_argument("--gpu-vocab", type=int, default=50304,
                    help="(c): 50257 padded to a multiple of 64, as nanoGPT and llm.c do for GPT-2 on GPUs")
    ap.add_argument("--gpu-layers", type=int, default=0, help="(c): override the preset's 12 layers (smoke run)")
    ap.add_argument("--gpu-warmup", type=int, default=5, help="(c): untimed steps (compilation)")
    ap.add_argument("--gpu-steps", type=int, default=20, help="(c): timed steps")
    ap.add_argument("--no-compile", action="store_true", help="(c): skip torch.compile")
    ap.add_argument("--gpu-profile", type=int, default=3,
                    help="(c): steps profiled after the timed ones, for a table of the kernels' time (0: none)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.only in (None, "quality"):
        quality(args)
    if args.only in (None, "throughput"):
        throughput(args)
    if args.only == "gpu":
        gpu(args)


if __name__ == "__main__":
    main()
