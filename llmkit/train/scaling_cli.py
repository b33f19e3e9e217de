"""`llmkit scaling`: train (or read) a ladder of small runs, fit the scaling laws, predict a larger run.

survey §2.1 (KM and Chinchilla laws) and §4.3 "predictable scaling" (GPT-4 predicted its final loss from
runs with 1/1000 of the compute). The ladder is a grid of Llama-style widths x token budgets, each trained
with the one `Trainer` (cosine decay to the end of its own budget, as Chinchilla's runs are), its final
loss measured on the same held-out tokens. The laws are fitted with `llmkit.train.scaling`; with
`--predict-factor K` one more run with K times the largest ladder compute is predicted *before* it is
trained, then trained and compared.

    llmkit scaling --data input.txt --out runs/scaling [--widths 32,48,64,96] [--tokens 1e5,2e5,4e5 | --tokens-per-param 5,10,20]
    llmkit scaling --runs runs/scaling/runs.jsonl --budget 1e18      # fit + compute-optimal N, D only
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from ..artifacts import atomic_write_json, write_manifest
from ..model import ModelConfig, Transformer
from .config import TrainConfig
from .scaling import fit_report, params_for_law, plot_fit, training_flops


def ladder_model(width: int, layers: int, vocab: int, seq_len: int) -> ModelConfig:
    """Llama-style shape: head size 16 (tiny widths keep >= 2 heads), SwiGLU, RMSNorm, RoPE."""
    return ModelConfig(vocab_size=vocab, d_model=width, n_layers=layers, n_heads=max(2, width // 16),
                       max_seq_len=seq_len, pos="rope", activation="swiglu", norm="rmsnorm", tie_embeddings=True)


def train_one(mcfg: ModelConfig, tokens: int, data, args, seed: int = 0) -> dict:
    """Train one ladder point for `tokens` tokens; returns N, D, FLOPs, final held-out loss, wall time."""
    from ..data.shards import BatchLoader
    from .trainer import Trainer

    train_ds, val_ds = data
    steps = max(10, int(tokens // (args.batch * args.seq_len)))
    # lr shrinks with width (muP-flavoured 1/sqrt rule, anchored at width 64); an assumption, recorded in the run
    lr = args.lr * math.sqrt(64 / mcfg.d_model)
    tcfg = TrainConfig(max_steps=steps, micro_batch_size=args.batch, seq_len=args.seq_len, lr=lr,
                       warmup_steps=max(1, steps // 20), min_lr_ratio=0.1, weight_decay=0.1, grad_clip=1.0,
                       eval_batches=max(1, args.eval_batches), log_every=10**9, progress=False, tensorboard=False,
                       seed=seed, device="cpu")
    torch.manual_seed(seed)
    model = Transformer(mcfg)
    train = BatchLoader(train_ds, args.batch, args.seq_len, seed=seed)
    # the final loss is measured on every window of the held-out split in order (0 = all of them), after the
    # cosine decay has ended: the same tokens for every run, no sampling noise between ladder points
    val = BatchLoader(val_ds, args.batch, args.seq_len, shuffle=False)
    t0 = time.time()
    trainer = Trainer(model, tcfg, train, out_dir=None, val_data=val)
    trainer.fit(resume=False)
    loss = trainer.evaluate(args.eval_batches or len(val))
    D = steps * args.batch * args.seq_len
    return {"width": mcfg.d_model, "layers": mcfg.n_layers, "N": params_for_law(mcfg), "D": D,
            "flops": training_flops(mcfg, D, args.seq_len), "loss": loss, "lr": lr, "steps": steps,
            "wall_s": round(time.time() - t0, 2)}


def load_text_data(path: str, val_fraction: float = 0.1):
    """Char-level token stream of a text file, split by position (first 90% train, last 10% held out)."""
    import numpy as np

    from ..data.shards import TokenDataset
    from .data import char_tokenizer

    text = Path(path).read_text(encoding="utf-8")
    tok = char_tokenizer(text)
    ids = np.asarray(tok.encode(text), dtype=np.uint16)
    cut = int(len(ids) * (1 - val_fraction))
    mk = lambda a: TokenDataset(arrays=[a], doc_starts=np.array([0], np.int64), eos_id=tok.eos_token_id)  # noqa: E731
    return (mk(ids[:cut]), mk(ids[cut:])), tok.vocab_size, len(ids)


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="llmkit scaling", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="text file to train the ladder on (char-level)")
    ap.add_argument("--runs", help="runs.jsonl of an earlier ladder: fit only")
    ap.add_argument("--out", default="runs/scaling", help="output directory")
    ap.add_argument("--widths", default="32,48,64,96", help="model widths of the ladder")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", default="1e5,2e5,4e5", help="training tokens per ladder run")
    ap.add_argument("--tokens-per-param", help="instead of --tokens: budgets as multiples of each model's N "
                    "(e.g. 5,10,20; Chinchilla's compute-optimal ratio is about 20)")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-batches", type=int, default=40, help="held-out batches for the final loss (0: the whole split)")
    ap.add_argument("--budget", type=float, help="FLOPs budget for the compute-optimal N and D")
    ap.add_argument("--predict-factor", type=float, default=0.0,
                    help="also predict, then train, a run with this many times the largest ladder compute")
    ap.add_argument("--predict-width", type=int, help="width of the predicted run (default: the largest ladder width)")
    args = ap.parse_args(argv)
    if not args.data and not args.runs:
        ap.error("give --data FILE to train a ladder, or --runs runs.jsonl to fit an existing one")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_path = out / "runs.jsonl"

    if args.runs:
        runs = [json.loads(line) for line in Path(args.runs).read_text().splitlines() if line.strip()]
    else:
        data, vocab, n_tokens = load_text_data(args.data)
        done = {}
        if runs_path.exists():  # resume: ladder points already trained are kept
            for line in runs_path.read_text().splitlines():
                r = json.loads(line)
                done[(r["width"], r["D"])] = r
        runs = []
        for w in (int(x) for x in _floats(args.widths)):
            mcfg = ladder_model(w, args.layers, vocab, args.seq_len)
            budgets = ([k * params_for_law(mcfg) for k in _floats(args.tokens_per_param)] if args.tokens_per_param
                       else _floats(args.tokens))
            for t in budgets:
                D = max(10, int(t // (args.batch * args.seq_len))) * args.batch * args.seq_len
                r = done.get((w, D)) or train_one(mcfg, int(t), data, args)
                if (w, D) not in done:
                    with runs_path.open("a") as f:
                        f.write(json.dumps(r) + "\n")
                print(f"  width {w:4d}  N {r['N']:>9,d}  D {r['D']:>10,d}  C {r['flops']:.3g}  loss {r['loss']:.4f}  ({r['wall_s']}s)")
                runs.append(r)

    report, ch, ka = fit_report(runs)
    report["n_runs"] = len(runs)
    print(f"Chinchilla fit: L = {ch.E:.3f} + {ch.A:.3g}/N^{ch.alpha:.3f} + {ch.B:.3g}/D^{ch.beta:.3f}")
    print(f"Kaplan fit: L = [({ka.Nc:.3g}/N)^({ka.alpha_N:.3f}/{ka.alpha_D:.3f}) + {ka.Dc:.3g}/D]^{ka.alpha_D:.3f}")
    if args.budget:
        n_opt, d_opt = ch.compute_optimal(args.budget)
        report["compute_optimal"] = {"budget": args.budget, "N": n_opt, "D": d_opt, "loss": ch.loss(n_opt, d_opt)}
        print(f"compute-optimal for C={args.budget:.3g}: N={n_opt:.3g} params, D={d_opt:.3g} tokens")

    predicted = None
    if args.predict_factor and args.data:
        width = args.predict_width or max(r["width"] for r in runs)
        mcfg = ladder_model(width, args.layers, vocab, args.seq_len)
        c_max = max(r["flops"] for r in runs)
        per_token = training_flops(mcfg, args.seq_len, args.seq_len) / args.seq_len
        # whole steps, rounded up: the run has at least predict_factor times the largest ladder compute
        D = max(10, math.ceil(args.predict_factor * c_max / per_token / (args.batch * args.seq_len))) * args.batch * args.seq_len
        pred = {"chinchilla": ch.loss(params_for_law(mcfg), D), "kaplan": ka.loss(params_for_law(mcfg), D)}
        print(f"predicting width {width}, D={D:,d} ({training_flops(mcfg, D, args.seq_len) / c_max:.1f}x the largest "
              f"ladder compute): Chinchilla {pred['chinchilla']:.4f}, Kaplan {pred['kaplan']:.4f}")
        r = train_one(mcfg, D, data, args)
        err = {k: abs(v / r["loss"] - 1) for k, v in pred.items()}
        predicted = {"run": r, "predicted": pred, "rel_error": err, "flops": r["flops"], "measured": r["loss"],
                     "compute_ratio": r["flops"] / c_max}
        report["prediction"] = predicted
        print(f"measured {r['loss']:.4f}: relative error Chinchilla {100 * err['chinchilla']:.2f}%, "
              f"Kaplan {100 * err['kaplan']:.2f}%")
    atomic_write_json(out / "fit.json", report)
    plot_fit(runs, ch, str(out / "scaling.png"),
             {"flops": predicted["flops"], "measured": predicted["measured"], "predicted": predicted["predicted"]["chinchilla"]}
             if predicted else None)
    write_manifest(out, "scaling", parents=[args.data] if args.data else [args.runs], config=vars(args))
    print(f"wrote {out / 'fit.json'} and {out / 'scaling.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
