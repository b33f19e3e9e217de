"""Bench: multiple-choice scoring speed and agreement, llmkit vs lm-evaluation-harness (survey §7).

Same run, same machine, same GGUF (SmolLM2-135M-Instruct Q4_1, dequantised to float32 by each side's own
loader: llmkit.load vs transformers' gguf_file), same items (the first --n of HellaSwag and ARC-Easy from
../shared/data, identical prompt strings), zero-shot:
  (a) scoring only: the (context, continuation) requests of the slice through llmkit's LlmkitLM.loglikelihood
      (batched, each context run once into the KV cache) and through lm-eval's HFLM.loglikelihood (batch
      size --hf-batch; lm-eval's default is 1) — wall time and ratio;
  (b) end to end: llmkit's harness vs lm_eval.simple_evaluate on local task YAMLs (task building included;
      llmkit's HellaSwag cache is cleared first), per-item agreement of the two harnesses, and the same with
      each side's model load from the GGUF added (the wall time of `llmkit eval` vs `lm_eval --model hf`);
  (c) agreement: accuracy of both, and the fraction of items where both pick the same answer.
  (d) `--tasks mmlu_anatomy --fewshot 5 --skip-e2e`: 5-shot prompts whose demo prefix is shared by every item,
      where llmkit also runs the batch's common prefix once (lm-eval already merges one-token continuations).
Both sides run on --threads torch threads (default 1: on the shared, oversubscribed 2-core machine each side
is ~2x faster on one thread than on two). The load average is printed with the figures.
Usage: .venv/bin/python bench/eval.py [--n 40] [--hf-batch 1,16] [--tasks hellaswag,arc_easy] [--skip-e2e]
       [--fewshot K] [--threads N] [--dtype float32|bfloat16]
The >= 500-item agreement run: bench/eval.py --n 500 --skip-e2e --hf-batch 16
       --tasks hellaswag,arc_easy,mmlu_anatomy,mmlu_astronomy,mmlu_college_biology,mmlu_high_school_geography
Recorded (2026-11-29, threads 1, load average ~1; details in docs/LOG.md): n=40, identical picks 80/80 in every
  comparison. llmkit vs lm-eval at batch 1 / batch 16: scoring 12.45 s vs 57.95 / 31.80 s (4.65x / 2.55x);
  harness 4.12x / 2.26x; + model load 5.36x / 3.60x; the two commands 16.4 s vs 97.9 / 75.1 s (5.98x / 4.58x).
  n=500 run (1629 items, load ~2): scoring 2.02x at batch 16, identical accuracy and picks on every task.
  Exact float32 scoring is matmul-bound: against batch 16 it cannot pass the ratio of computed tokens (~2.2x on
  this slice, plus lm-eval's vocabulary projection at every position).
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


def agreement(a, b) -> str:
    """Accuracy of both pick lists [(task, pick, gold)], the difference in points, and the same-pick rate."""
    acc_a = sum(p == g for _, p, g in a) / len(a)
    acc_b = sum(p == g for _, p, g in b) / len(b)
    same = sum(x[1] == y[1] for x, y in zip(a, b)) / len(a)
    return (f"acc llmkit {acc_a:.4f}  lm-eval {acc_b:.4f}  |diff| {abs(acc_a - acc_b) * 100:.2f} points  "
            f"same pick {same:.3f}")


def _loadavg() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3]) if os.path.exists("/proc/loadavg") else "n/a"


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
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for both sides (0: torch's choice). 1 by default: on the shared, oversubscribed "
                         "2-core machine both sides run ~2x faster on one thread than on two (OpenMP barriers wait "
                         "for a descheduled thread at every op)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="both sides' weights and activations (bfloat16: oneDNN bf16 matmuls, AMX where the CPU has it)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds of the command timings (e); best is kept")
    ap.add_argument("--only-commands", action="store_true", help="only (e), the two commands' wall time")
    args = ap.parse_args()
    if args.only_commands:
        return commands(args)
    print(f"load average at start: {_loadavg()}; dtype {args.dtype}")

    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    import llmkit
    from llmkit.eval.lm import LlmkitLM
    from llmkit.interop.loading import resolve_alias

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}")
    gguf = resolve_alias("smollm2-135m-instruct")
    (model, tok), t_load_ours = timed(lambda: llmkit.load("smollm2-135m-instruct", dtype=getattr(torch, args.dtype)))
    batches = [int(b) for b in args.hf_batch.split(",")]
    hf, t_load_hf = timed(lambda: HFLM(pretrained=str(gguf.parent), gguf_file=gguf.name, dtype=args.dtype,
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
        s_hf, t_hf = timed(lambda: hf.loglikelihood(inst, disable_tqdm=len(items) < 200))
        print(f"    lm-eval HFLM(batch_size={b}) {t_hf:8.2f}s   llmkit speed-up {t_hf / t_ours:.2f}x")
    p_ours, p_hf = picks(items, s_ours), picks(items, s_hf)
    names = [t for t in dict.fromkeys(n for n, *_ in items)]
    groups = [(n, [n]) for n in names]
    mmlu = [n for n in names if n.startswith("mmlu_")]
    if len(mmlu) > 1:
        groups.append(("mmlu(" + "+".join(m[5:] for m in mmlu) + ")", mmlu))
    for label, members in groups:
        a = [p for p in p_ours if p[0] in members]
        b = [p for p in p_hf if p[0] in members]
        print(f"(c) {label:10s} n={len(a)}  {agreement(a, b)}")
    dmax = max(abs(a[0] - b[0]) for a, b in zip(s_ours, s_hf))
    print(f"    max |log p llmkit - log p lm-eval| over requests: {dmax:.2e}")
    print(f"load average after scoring: {_loadavg()}")
    if args.skip_e2e:
        return
    e2e(args, ours, hf, t_load_ours, t_load_hf)
    del ours, hf, model
    commands(args)


def e2e(args, ours, hf, t_load_ours: float, t_load_hf: float) -> None:
    """(b) each harness from task files to results: llmkit's `evaluate` (what `llmkit eval` runs) and lm-eval's
    `simple_evaluate` on local task YAMLs over the same files, models already in memory; `+ load` adds each
    side's model load from the GGUF (timed above) for the whole command's wall time."""
    from llmkit.eval.harness import EvalConfig, evaluate
    from llmkit.eval.lm_eval_adapter import run_lm_eval, write_local_tasks
    from llmkit.eval.tasks import get_tasks, mc

    names = args.tasks.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        local = write_local_tasks(SHARED, tmp, tasks=tuple(names))
        mc._HS_CACHE.clear()  # (a) read HellaSwag already: make llmkit decompress and parse it again, as lm-eval does
        (res_ours, samples_ours), t_ours = timed(
            lambda: evaluate(ours, get_tasks(args.tasks, SHARED), EvalConfig(limit=args.n, progress=False)))
        runs = []
        for b in (int(x) for x in args.hf_batch.split(",")):
            hf.batch_size_per_gpu = b
            runs.append((b, *timed(lambda: run_lm_eval(hf, local, tmp, limit=args.n))))
    print(f"\n(b) end to end, threads {args.threads}, load average {_loadavg()}")
    for b, res_hf, t_hf in runs:
        print(f"    lm-eval batch_size={b}:")
        for name, lname in zip(names, local):
            a = [("", s["pred"], s["target"]) for s in samples_ours if s["task"] == name]
            hs = sorted(res_hf["samples"][lname], key=lambda s: s["doc_id"])
            p = [("", max(range(len(s["filtered_resps"])), key=lambda j: float(s["filtered_resps"][j][0])),
                  int(s.get("target", s["doc"].get("gold")))) for s in hs]
            acc_hf = res_hf["results"][lname]["acc,none"]
            print(f"    {name:10s} n={len(a)}  {agreement(a, p)}  (lm-eval's own acc {acc_hf:.4f})")
        print(f"    harness (models in memory): llmkit {t_ours:.2f}s  lm_eval.simple_evaluate {t_hf:.2f}s  "
              f"speed-up {t_hf / t_ours:.2f}x")
        print(f"    + model load from the GGUF: llmkit {t_ours + t_load_ours:.2f}s  lm-eval {t_hf + t_load_hf:.2f}s  "
              f"speed-up {(t_hf + t_load_hf) / (t_ours + t_load_ours):.2f}x")

def commands(args) -> None:
    """(e) the two commands a user runs, as subprocesses from process start to results on disk (imports, model
    load from the same GGUF, task building, scoring, writing): `llmkit eval` vs `lm-eval run --model hf` at each
    --hf-batch size on the same local task files; best of --rounds interleaved rounds; same-pick rate from the
    samples each command wrote."""
    import json
    import subprocess

    from llmkit.eval.lm_eval_adapter import write_local_tasks
    from llmkit.interop.loading import resolve_alias

    gguf = resolve_alias("smollm2-135m-instruct")
    names = args.tasks.split(",")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads or os.cpu_count()), "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        local = write_local_tasks(SHARED, Path(tmp) / "tasks", tasks=tuple(names))  # lm-eval reads these YAMLs
        ours = [sys.executable, "-m", "llmkit", "eval", "smollm2-135m-instruct", "--tasks", args.tasks, "--limit",
                str(args.n), "--dtype", args.dtype, "--no-progress", "--output", f"{tmp}/ours"]
        if args.threads:
            ours += ["--threads", str(args.threads)]

        def peer(b):
            return [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
                    f"pretrained={gguf.parent},gguf_file={gguf.name},dtype={args.dtype}", "--tasks", ",".join(local),
                    "--include_path", f"{tmp}/tasks", "--limit", str(args.n), "--batch_size", str(b), "--device", "cpu",
                    "--output_path", f"{tmp}/peer{b}", "--log_samples"]

        cmds = {"llmkit": ours, **{f"lm-eval b={b}": peer(b) for b in (int(x) for x in args.hf_batch.split(","))}}
        best: dict[str, float] = {}
        for _ in range(args.rounds):
            for name, cmd in cmds.items():
                t = time.perf_counter()
                r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
                if r.returncode:
                    raise SystemExit(f"{name} failed ({r.returncode}):\n{r.stderr[-3000:]}")
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
        mine = [json.loads(x) for x in open(f"{tmp}/ours/samples.jsonl")]
        print(f"\n(e) commands, process start to results (best of {args.rounds}), threads {args.threads}, "
              f"load average {_loadavg()}")
        print(f"    llmkit eval: {best['llmkit']:.2f}s")
        for b in (int(x) for x in args.hf_batch.split(",")):
            picks_peer = {}
            for f in Path(f"{tmp}/peer{b}").rglob("samples_*.jsonl"):
                task = next(n for n, ln in zip(names, local) if f.name.startswith(f"samples_{ln}_"))
                for x in map(json.loads, open(f)):
                    lps = [float(r[0]) for r in x["filtered_resps"]]
                    picks_peer[(task, x["doc_id"])] = max(range(len(lps)), key=lps.__getitem__)
            same = [picks_peer.get((task, doc_id)) == row["pred"]  # samples.jsonl keeps each task's item order
                    for task in names for doc_id, row in enumerate(r for r in mine if r["task"] == task)]
            t_peer = best[f"lm-eval b={b}"]
            print(f"    lm-eval run --batch_size {b}: {t_peer:.2f}s  speed-up {t_peer / best['llmkit']:.2f}x  "
                  f"same pick {sum(same) / len(same):.3f} of {len(same)}")


if __name__ == "__main__":
    main()
