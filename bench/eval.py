"""Bench: multiple-choice scoring speed and agreement, llmkit vs lm-evaluation-harness (survey §7).

Same run, same machine, same GGUF (SmolLM2-135M-Instruct Q4_1, dequantised to float32 by each side's own
loader: llmkit.load vs transformers' gguf_file), same items (the first --n of HellaSwag and ARC-Easy from
../shared/data, identical prompt strings), zero-shot:
  (a) scoring only: the (context, continuation) requests of the slice through llmkit's LlmkitLM.loglikelihood
      (batched, each context run once into the KV cache) and through lm-eval's HFLM.loglikelihood (batch
      size --hf-batch; lm-eval's default is 1) — wall time and ratio;
  (b) end to end: llmkit's harness vs lm_eval.simple_evaluate on local task YAMLs (task building included);
  (c) agreement: accuracy of both, and the fraction of items where both pick the same answer.
The >= 500-item comparison of the issue is `--n 500 --skip-e2e` (tens of minutes on 2 CPU cores).
  (d) `--tasks mmlu_anatomy --fewshot 5 --skip-e2e`: 5-shot prompts whose demo prefix is shared by every item,
      where llmkit also runs the batch's common prefix once (lm-eval already merges one-token continuations).
Usage: .venv/bin/python bench/eval.py [--n 40] [--hf-batch 1,16] [--tasks hellaswag,arc_easy] [--skip-e2e]
       [--fewshot K]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("LLMKIT_SHARED_DATA", REPO.parent / "shared" / "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def requests_for(tasks, n, k=0):
    """(task, index, gold, requests) per item; k > 0 prepends the harness's k-shot prefix (MMLU: first k dev)."""
    from llmkit.eval.harness import EvalConfig, demos_for
    from llmkit.eval.tasks import fewshot_prefix, get_tasks

    out = []
    for t in get_tasks(tasks, SHARED):
        pool = t.fewshot_docs() if k else []
        for i, d in enumerate(t.docs()[:n]):
            demos = demos_for(t, i, d, k, EvalConfig(), pool, getattr(t, "fewshot_loader", None) is None)
            out.append((t.name, i, t.gold_fn(d), t.requests(d, fewshot_prefix(t, demos))))
    return out


def picks(items, scores):
    res, k = [], 0
    for name, i, gold, reqs in items:
        lps = [s[0] for s in scores[k:k + len(reqs)]]
        k += len(reqs)
        res.append((name, max(range(len(lps)), key=lambda j: lps[j]), gold))
    return res


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=40, help="items per task")
    ap.add_argument("--tasks", default="hellaswag,arc_easy")
    ap.add_argument("--hf-batch", default="1,16", help="lm-eval HFLM batch size(s), comma-separated (its default is 1)")
    ap.add_argument("--skip-e2e", action="store_true", help="only the scoring comparison")
    ap.add_argument("--fewshot", type=int, default=0, help="k-shot prompts (e.g. --tasks mmlu_anatomy --fewshot 5)")
    args = ap.parse_args()

    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    import llmkit
    from llmkit.eval.lm import LlmkitLM
    from llmkit.interop.loading import resolve_alias

    torch.manual_seed(0)
    gguf = resolve_alias("smollm2-135m-instruct")
    (model, tok), t_load_ours = timed(lambda: llmkit.load("smollm2-135m-instruct"))
    batches = [int(b) for b in args.hf_batch.split(",")]
    hf, t_load_hf = timed(lambda: HFLM(pretrained=str(gguf.parent), gguf_file=gguf.name, dtype="float32",
                                       batch_size=batches[-1], device="cpu"))
    print(f"load: llmkit {t_load_ours:.1f}s, lm-eval/transformers {t_load_hf:.1f}s")
    items = requests_for(args.tasks, args.n, args.fewshot)
    reqs = [r for *_, rs in items for r in rs]
    ours = LlmkitLM(model, tok)
    inst = [Instance("loglikelihood", {}, r, i) for i, r in enumerate(reqs)]
    # warm-up both on a few requests so one-time costs (allocator, kernels) are not timed
    ours.loglikelihood(reqs[:8])
    hf.loglikelihood(inst[:8], disable_tqdm=True)
    s_ours, t_ours = timed(lambda: ours.loglikelihood(reqs))
    n_tok = sum(len(ours.encode(c + x)) for c, x in reqs)
    print(f"\n(a) scoring {len(items)} items / {len(reqs)} requests / ~{n_tok} tokens: llmkit {t_ours:.2f}s")
    for b in batches:
        hf.batch_size_per_gpu = b
        s_hf, t_hf = timed(lambda: hf.loglikelihood(inst, disable_tqdm=True))
        print(f"    lm-eval HFLM(batch_size={b}) {t_hf:8.2f}s   llmkit speed-up {t_hf / t_ours:.2f}x")
    p_ours, p_hf = picks(items, s_ours), picks(items, s_hf)
    for name in args.tasks.split(","):
        a = [p for p in p_ours if p[0] == name]
        b = [p for p in p_hf if p[0] == name]
        acc_a = sum(p == g for _, p, g in a) / len(a)
        acc_b = sum(p == g for _, p, g in b) / len(b)
        same = sum(x[1] == y[1] for x, y in zip(a, b)) / len(a)
        print(f"(c) {name:10s} n={len(a)}  acc llmkit {acc_a:.4f}  lm-eval {acc_b:.4f}  "
              f"|diff| {abs(acc_a - acc_b) * 100:.2f} points  same pick {same:.3f}")
    dmax = max(abs(a[0] - b[0]) for a, b in zip(s_ours, s_hf))
    print(f"    max |log p llmkit - log p lm-eval| over requests: {dmax:.2e}")
    if args.skip_e2e:
        return
    from llmkit.eval.harness import EvalConfig, evaluate
    from llmkit.eval.lm_eval_adapter import run_lm_eval, write_local_tasks
    from llmkit.eval.tasks import get_tasks

    with tempfile.TemporaryDirectory() as tmp:
        names = write_local_tasks(SHARED, tmp, tasks=tuple(args.tasks.split(",")))
        _, t_e2e_ours = timed(lambda: evaluate(ours, get_tasks(args.tasks, SHARED), EvalConfig(limit=args.n, progress=False)))
        _, t_e2e_hf = timed(lambda: run_lm_eval(hf, names, tmp, limit=args.n))
    print(f"\n(b) end to end: llmkit harness {t_e2e_ours:.2f}s   lm_eval.simple_evaluate {t_e2e_hf:.2f}s   "
          f"speed-up {t_e2e_hf / t_e2e_ours:.2f}x")


if __name__ == "__main__":
    main()
