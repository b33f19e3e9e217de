"""bench/gsm8k_lora.py — does LoRA SFT on GSM8K train raise SmolLM2-135M-Instruct's GSM8K test accuracy? (survey §5.1, §7.1.3)

    .venv/bin/python bench/gsm8k_lora.py [--steps 300] [--batch 8] [--max-len 256] [--n-test 250] [--out DIR]
        [--stage all|before|train|after|report] [--part A:B]

1. Evaluates the base model with the evaluation harness (`llmkit.eval.harness.evaluate`, task `gsm8k`: the
   prompt "Question: ...\\nAnswer:", zero-shot, greedy, at most --max-new tokens, batched KV-cache generation,
   scored by the harness's own GSM8K scorer: strict '####' / 'The answer is' match, and the last-number match)
   on the first --n-test test items.
2. Trains LoRA adapters (r=16, alpha=32, all linear layers) with the llmkit Trainer + `sft_loss` on GSM8K train
   items rendered in that same format ("Question: q\\nAnswer: <worked steps>\\n#### N" + EOS; calculator notes
   <<..>> dropped; loss on the answer only; items longer than --max-len tokens skipped, not truncated).
3. Evaluates the tuned model on the same items with the same prompt, then prints both accuracies with 95%
   Wilson intervals, the items flipped each way and the exact two-sided McNemar (sign test) p-value.
Writes DIR/report.json, DIR/samples_{before,after}*.jsonl, DIR/train.json and DIR/adapter/ (PEFT format).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import torch  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (sensible near 0, unlike the normal one)."""
    if n == 0:
        return 0.0, 0.0
    p = k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, c - h), min(1.0, c + h)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: b, c = discordant pairs; under H0 each is Binomial(b + c, 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def train_examples(tok, rows: list[dict], max_len: int) -> list[dict]:
    """GSM8K train items in the harness's prompt format; the worked answer (+EOS) carries the loss."""
    from llmkit.adapt.sft import tokenize_pair
    from llmkit.eval.tasks.generative import gsm8k

    text_fn = gsm8k(DATA.parent).text_fn  # the exact prompt the harness evaluates with
    out = []
    for r in rows:
        body, _, final = r["answer"].rpartition("####")
        steps = re.sub(r"<<[^>]*>>", "", body).strip()
        ex = tokenize_pair(tok, text_fn(r), f" {steps}\n#### {final.strip()}")
        if len(ex["input_ids"]) <= max_len:
            out.append(ex)
    return out


def harness_eval(model, tok, n_test: int, max_new: int, out: Path, tag: str, gen_batch: int = 16,
                 part: tuple[int, int] | None = None) -> list[dict]:
    """The harness's gsm8k task (zero-shot, greedy) on test items [0, n_test), or on the slice `part` of them
    (several processes can share an evaluation); samples keep their item index as doc_id."""
    from llmkit.eval.harness import EvalConfig, evaluate
    from llmkit.eval.lm import LlmkitLM
    from llmkit.eval.tasks import get_tasks

    model.eval()
    lm = LlmkitLM(model, tok, name=tag)
    lm.gen_batch = gen_batch
    task = get_tasks("gsm8k", DATA.parent)[0]
    a, b = part or (0, n_test)
    full = task.loader
    task.loader = lambda: full()[a:b]
    cfg = EvalConfig(num_fewshot=0, max_new_tokens=max_new, progress=False)
    t = time.perf_counter()
    res, samples = evaluate(lm, [task], cfg)
    for s in samples:
        s["doc_id"] += a
    m = res["results"]["gsm8k"]["metrics"]
    print(f"[{tag} {a}:{b}] n={len(samples)} exact_match {m['exact_match']['value']:.4f} flexible_match "
          f"{m['flexible_match']['value']:.4f} ({time.perf_counter() - t:.0f} s)", flush=True)
    name = f"samples_{tag}.jsonl" if part is None else f"samples_{tag}_{a}-{b}.jsonl"
    with open(out / name, "w") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")
    return samples


def read_samples(out: Path, tag: str, n_test: int) -> list[dict]:
    """All samples of a tag (whole-run and slice files), one per item 0..n_test-1, or an error naming the gap."""
    got = {}
    for f in sorted(out.glob(f"samples_{tag}*.jsonl")):
        for line in f.read_text().splitlines():
            s = json.loads(line)
            got[s["doc_id"]] = s
    missing = [i for i in range(n_test) if i not in got]
    if missing:
        raise SystemExit(f"{out}: no '{tag}' sample for {len(missing)} items (first: {missing[:5]}); run --stage {tag}")
    return [got[i] for i in range(n_test)]


def train(model, tok, args) -> dict:
    from llmkit.adapt.logprobs import sft_loss
    from llmkit.adapt.peft import apply_lora, save_adapter
    from llmkit.adapt.sft import SFTLoader
    from llmkit.eval.tasks.base import read_jsonl
    from llmkit.train.config import TrainConfig
    from llmkit.train.trainer import Trainer

    rows = read_jsonl(DATA / "train.jsonl", ("question", "answer"))
    random.Random(args.seed).shuffle(rows)
    need = args.steps * args.batch
    exs = train_examples(tok, rows[: int(need * 1.2) + 64], args.max_len)[:need]  # ~1 epoch over fresh items
    apply_lora(model, 16, 32, 0.05, TARGETS)
    model.train()
    cfg = TrainConfig(max_steps=args.steps, micro_batch_size=args.batch, seq_len=args.max_len, lr=args.lr,
                      warmup_steps=max(1, args.steps // 20), schedule="cosine", min_lr_ratio=0.1, weight_decay=0.0,
                      progress=False, tensorboard=False, device="cpu", log_every=max(1, args.steps // 15),
                      ckpt_every=0, seed=args.seed, dtype=args.dtype)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    data = SFTLoader(exs, args.batch, pad, seed=args.seed)
    t = time.perf_counter()
    Trainer(model, cfg, data, loss_fn=sft_loss, out_dir=str(args.out / "train")).fit(resume=False)
    secs = time.perf_counter() - t
    print(f"[train] {args.steps} steps x {args.batch} items ({len(exs)} distinct train items) in {secs:.0f} s", flush=True)
    save_adapter(model, args.out / "adapter", "smollm2-135m-instruct")
    run = {"steps": args.steps, "batch": args.batch, "train_items": len(exs), "seconds": secs, "lr": args.lr,
           "max_len": args.max_len, "dtype": args.dtype}
    (args.out / "train.json").write_text(json.dumps(run, indent=2))
    return run


def compare(before: list[dict], after: list[dict], metric: str) -> dict:
    a = [s[metric] for s in before]
    b = [s[metric] for s in after]
    n = len(a)
    gained = sum(1 for x, y in zip(a, b) if y > x)
    lost = sum(1 for x, y in zip(a, b) if x > y)
    ka, kb = int(sum(a)), int(sum(b))
    return {"n": n, "before": ka / n, "after": kb / n, "before_ci95": wilson(ka, n), "after_ci95": wilson(kb, n),
            "gained": gained, "lost": lost, "mcnemar_p": mcnemar_exact(gained, lost)}


def report(args) -> None:
    before = read_samples(args.out, "before", args.n_test)
    after = read_samples(args.out, "after", args.n_test)
    run = json.loads((args.out / "train.json").read_text())
    rep = {"train": run, "n_test": args.n_test, "max_new_tokens": args.max_new,
           "exact_match": compare(before, after, "exact_match"), "flexible_match": compare(before, after, "flexible_match")}
    (args.out / "report.json").write_text(json.dumps(rep, indent=2))
    print(f"LoRA SFT: {run['steps']} steps x {run['batch']} GSM8K train items, lr {run['lr']}, {run['dtype']} autocast, "
          f"{run['seconds']:.0f} s")
    for metric in ("exact_match", "flexible_match"):
        r = rep[metric]
        print(f"GSM8K {metric:<14} n={r['n']}  before {r['before']:.3f} [{r['before_ci95'][0]:.3f}, {r['before_ci95'][1]:.3f}]"
              f"  after {r['after']:.3f} [{r['after_ci95'][0]:.3f}, {r['after_ci95'][1]:.3f}]  "
              f"flipped +{r['gained']} / -{r['lost']}  McNemar p={r['mcnemar_p']:.2g}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--n-test", type=int, default=250)
    ap.add_argument("--max-new", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 on a shared machine (OpenMP threads spin-wait when descheduled: 2 threads "
                         "under load 8 on 2 cores ran decoding 10x slower than 1 thread)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="training autocast (evaluation is fp32)")
    ap.add_argument("--gen-batch", type=int, default=16, help="prompts per batched generation call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/gsm8k_lora_out"))
    ap.add_argument("--stage", default="all", choices=["all", "before", "train", "after", "report"],
                    help="one step only (they communicate through --out): e.g. evaluate slices in parallel processes")
    ap.add_argument("--part", default=None, metavar="A:B", help="with --stage before|after: test items A..B-1 only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    import llmkit
    from llmkit.adapt.peft import load_adapter

    part = tuple(int(x) for x in args.part.split(":")) if args.part else None
    stages = ["before", "train", "after", "report"] if args.stage == "all" else [args.stage]
    model, tok = llmkit.load("smollm2-135m-instruct")
    for stage in stages:
        if stage == "before":
            harness_eval(model, tok, args.n_test, args.max_new, args.out, "before", args.gen_batch, part)
        elif stage == "train":
            train(model, tok, args)
        elif stage == "after":
            if not any(m.__class__.__name__ == "LoRALinear" for m in model.modules()):
                load_adapter(model, args.out / "adapter")  # a separate process: the adapter `train` saved
            harness_eval(model, tok, args.n_test, args.max_new, args.out, "after", args.gen_batch, part)
        else:
            report(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
