"""The evaluation harness (survey §7.1, §7.3.1): tasks x model -> metrics with standard errors, per-item samples.

Implements `evaluate(lm, tasks, EvalConfig) -> (results, samples)`:
- few-shot prompts from each task's demo pool through `prompting.icl` selection/ordering (the query itself is
  never its own demo); MMLU takes the first k dev items, as lm-eval's `first_n` sampler does;
- multiple choice: every (context, continuation) request of a slice of items goes to ONE batched
  `loglikelihood` call, so the model interface can share each context's KV cache across its choices;
  `acc`, `acc_norm`; TruthfulQA-MC2's true-answer probability mass; LAMBADA's greedy last word;
- generation: greedy, or `--self-consistency N` sampled paths with a majority vote; `--cot` uses chain-of-thought
  demos (the task's own, or rationales of synthetic items); answers extracted and scored by the task;
- code: n samples per problem executed in the sandbox, unbiased pass@k;
- perplexity: rolling windows; token/word/byte perplexity and bits per byte;
- group averages (MMLU: macro over subjects and micro over items). Same inputs, same config -> same numbers.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Iterable

import numpy as np

from ..prompting import icl
from .metrics import answers_match, bootstrap_stderr, mc_predictions, mean_stderr
from .tasks import CodeTask, GenTask, MCTask, PerplexityTask, Task, fewshot_prefix
from .tasks.symbolic import cot_demo

CHUNK = 64  # items per batched scoring call: large enough to fill length-sorted batches, small enough for a live progress bar


@dataclass
class EvalConfig:
    num_fewshot: int | None = None  # None: the task's default
    limit: int | None = None  # first N items of each task
    cot: bool = False
    self_consistency: int = 0  # N sampled paths (0: greedy)
    sc_temperature: float = 0.7
    fewshot_select: str = "default"  # default | random | first | bm25 | knn | mmr
    fewshot_order: str = "as_is"  # as_is | reverse | random | similarity
    seed: int = 1234  # lm-eval's default few-shot seed
    max_new_tokens: int | None = None
    code_samples: int = 1
    code_temperature: float = 0.8  # Chen et al. (2021) use 0.8 for pass@10/100
    progress: bool = True


def _progress(total: int, desc: str, on: bool):
    if not on:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="item", leave=False, dynamic_ncols=True)


def _chunks(seq: list, n: int) -> Iterable[list]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


# --------------------------------------------------------------------------- few-shot
_POOL_TEXTS: dict = {}


def demos_for(task: Task, doc_index: int, doc: dict, k: int, cfg: EvalConfig, pool: list[dict],
              same_pool: bool) -> list[dict]:
    if k <= 0 or not pool:
        return []
    method = cfg.fewshot_select
    if method == "default":
        method = "first" if task.group == "mmlu" else "random"
    if _POOL_TEXTS.get("task") is not task or _POOL_TEXTS.get("pool") is not pool:  # once per task, not per query
        # holding the objects themselves (not their ids) rules out a stale hit on a recycled id
        _POOL_TEXTS.update(task=task, pool=pool, texts=[task.doc_to_text(d) for d in pool])
    texts = _POOL_TEXTS["texts"]
    query = task.doc_to_text(doc)
    idx = icl.select(texts, query, k, method, seed=cfg.seed + doc_index, exclude=doc_index if same_pool else None)
    idx = icl.order(idx, texts, query, cfg.fewshot_order, seed=cfg.seed + doc_index)
    return [pool[i] for i in idx]


def _setup(task: Task, cfg: EvalConfig) -> tuple[list[dict], list[dict], bool, int]:
    docs = task.docs()
    if cfg.limit is not None:
        docs = docs[:cfg.limit]
    k = task.default_fewshot if cfg.num_fewshot is None else cfg.num_fewshot
    pool = task.fewshot_docs() if k > 0 else []
    same = k > 0 and getattr(task, "fewshot_loader", None) is None  # demos come from the evaluation docs
    return docs, pool, same, k


# --------------------------------------------------------------------------- multiple choice
def eval_mc(lm, task: MCTask, cfg: EvalConfig):
    docs, pool, same, k = _setup(task, cfg)
    rows, samples = [], []
    bar = _progress(len(docs), task.name, cfg.progress)
    for chunk in _chunks(list(enumerate(docs)), CHUNK):
        reqs, spans = [], []
        for i, d in chunk:
            r = task.requests(d, fewshot_prefix(task, demos_for(task, i, d, k, cfg, pool, same)))
            spans.append((len(reqs), len(reqs) + len(r)))
            reqs += r
        out = lm.loglikelihood(reqs)
        for (i, d), (a, b) in zip(chunk, spans):
            lps, greedy = [o[0] for o in out[a:b]], [o[1] for o in out[a:b]]
            row = _score_mc(task, d, lps, greedy)
            rows.append(row)
            samples.append({"doc_id": i, "prompt": reqs[a][0], "choices": [x for _, x in reqs[a:b]],
                            "logprobs": lps, "target": task.gold_fn(d), **row})
        if bar:
            bar.update(len(chunk))
    if bar:
        bar.close()
    metrics = {m: mean_stderr([r[m] for r in rows]) for m in rows[0] if not m.startswith("pred")} if rows else {}
    if task.kind == "lastword" and rows:
        nll = [-r["logprob"] for r in rows]
        metrics["perplexity"] = (math.exp(float(np.mean(nll))),
                                 bootstrap_stderr(nll, lambda v: math.exp(float(np.mean(v))), iters=200))
        metrics.pop("logprob", None)
    return metrics, samples, len(docs)


def _score_mc(task: MCTask, doc: dict, lps: list[float], greedy: list[bool]) -> dict:
    if task.kind == "lastword":
        return {"acc": float(greedy[0]), "logprob": lps[0]}
    gold = task.gold_fn(doc)
    raw, norm = mc_predictions(lps, ["x" * n for n in task.norm_lengths(doc)])
    row = {"acc": float(raw == gold), "acc_norm": float(norm == gold), "pred": raw, "pred_norm": norm}
    if task.multi_true is not None:  # TruthfulQA MC2: normalised probability mass on the true answers
        p = np.exp(np.array(lps) - max(lps))
        row = {"mc2": float(p[task.multi_true(doc)].sum() / p.sum()), "pred": raw}
    return row


# --------------------------------------------------------------------------- generation
def gen_prompt(task: GenTask, i: int, doc: dict, k: int, cfg: EvalConfig, pool, same) -> str:
    if cfg.cot:
        q = "Q: " + doc["question"] + "\nA:"
        if task.cot_demos:
            return task.cot_demos[: _cut_demos(task.cot_demos, k)] + q
        demos = demos_for(task, i, doc, max(k, 1), cfg, pool, same)
        return "".join(cot_demo(d) + "\n\n" for d in demos) + q
    return fewshot_prefix(task, demos_for(task, i, doc, k, cfg, pool, same)) + task.doc_to_text(doc)


def _cut_demos(text: str, k: int) -> int:
    """Length of the first k blank-line-separated demos of a fixed CoT demo block (k <= 0: all of them)."""
    if k <= 0:
        return len(text)
    ends = [m.end() for m in re.finditer(r"\n\n", text)]
    return ends[k - 1] if k <= len(ends) else len(text)


def eval_gen(lm, task: GenTask, cfg: EvalConfig):
    from ..prompting.cot import self_consistency

    docs, pool, same, k = _setup(task, cfg)
    max_new = cfg.max_new_tokens or task.max_new_tokens
    stop = task.stop + (["\nQ:"] if cfg.cot else [])
    rows, samples = [], []
    bar = _progress(len(docs), task.name, cfg.progress)
    for chunk in _chunks(list(enumerate(docs)), CHUNK):
        prompts = [gen_prompt(task, i, d, k, cfg, pool, same) for i, d in chunk]
        if cfg.self_consistency > 1:
            votes = self_consistency(lm, prompts, n=cfg.self_consistency, temperature=cfg.sc_temperature,
                                     extract=task.extract_fn, max_new_tokens=max_new, stop=stop, seed=cfg.seed)
            outs = [v.samples[0] for v in votes]
            preds = [v.answer for v in votes]
        else:
            outs = lm.generate(prompts, max_new_tokens=max_new, stop=stop)
            preds = [task.extract_fn(o) for o in outs]
        for (i, d), p, o, pred in zip(chunk, prompts, outs, preds):
            if cfg.self_consistency > 1:
                row = {"exact_match": float(answers_match(pred, task.answer_fn(d)))}
            else:
                row = task.score(o, d)
            rows.append(row)
            samples.append({"doc_id": i, "prompt": p, "prediction": o, "extracted": pred,
                            "target": task.answer_fn(d), **row})
        if bar:
            bar.update(len(chunk))
    if bar:
        bar.close()
    metrics = {m: mean_stderr([r[m] for r in rows]) for m in rows[0]} if rows else {}
    return metrics, samples, len(docs)


# --------------------------------------------------------------------------- code
def eval_code(lm, task: CodeTask, cfg: EvalConfig):
    docs, _, _, _ = _setup(task, cfg)
    n = max(cfg.code_samples, 1)
    task.ks = tuple(k for k in (1, 10, 100) if k <= n)
    temp = 0.0 if n == 1 else cfg.code_temperature
    max_new = cfg.max_new_tokens or task.max_new_tokens
    rows, samples = [], []
    bar = _progress(len(docs), task.name, cfg.progress)
    for i, d in enumerate(docs):
        comps = [c for j in range(n) for c in lm.generate([d["prompt"]], max_new_tokens=max_new, stop=task.stop,
                                                          temperature=temp, seed=cfg.seed + 1000 * i + j)]
        scores, runs = task.score_samples(d, comps)
        rows.append(scores)
        samples.append({"doc_id": i, "task_id": d["task_id"], "prompt": d["prompt"], "completions": comps,
                        "runs": runs, **scores})
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    metrics = {m: mean_stderr([r[m] for r in rows]) for m in rows[0]} if rows else {}
    return metrics, samples, len(docs)


# --------------------------------------------------------------------------- perplexity
def eval_ppl(lm, task: PerplexityTask, cfg: EvalConfig):
    docs, _, _, _ = _setup(task, cfg)
    texts = [d["text"] for d in docs]
    bar = _progress(len(texts), task.name, cfg.progress)
    out = []
    for t in texts:
        out += lm.loglikelihood_rolling([t])
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    lp = sum(o[0] for o in out)
    toks = sum(o[1] for o in out)
    n_words = sum(len(re.split(r"\s+", t)) for t in texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    nan = float("nan")
    metrics = {"word_perplexity": (math.exp(-lp / n_words), nan), "byte_perplexity": (math.exp(-lp / n_bytes), nan),
               "bits_per_byte": (-lp / n_bytes / math.log(2), nan), "token_perplexity": (math.exp(-lp / toks), nan)}
    samples = [{"doc_id": i, "logprob": o[0], "tokens": o[1], "bytes": len(t.encode())}
               for i, (t, o) in enumerate(zip(texts, out))]
    return metrics, samples, len(docs)


# --------------------------------------------------------------------------- driver
PRIMARY = ("acc", "mc2", "exact_match", "pass@1", "bits_per_byte")


def evaluate_task(lm, task: Task, cfg: EvalConfig) -> tuple[dict, list[dict]]:
    fn = {MCTask: eval_mc, GenTask: eval_gen, CodeTask: eval_code, PerplexityTask: eval_ppl}[type(task)]
    metrics, samples, n = fn(lm, task, cfg)
    primary = next((m for m in PRIMARY if m in metrics), next(iter(metrics), None))
    value, stderr = metrics.get(primary, (nan := float("nan"), nan))
    res = {"metric": primary, "value": value, "stderr": stderr, "n": n,
           "metrics": {m: {"value": v, "stderr": s} for m, (v, s) in metrics.items()}}
    return res, [{"task": task.name, **s} for s in samples]


def evaluate(lm, tasks: list[Task], cfg: EvalConfig | None = None) -> tuple[dict, list[dict]]:
    cfg = cfg or EvalConfig()
    results, samples = {}, []
    for t in tasks:
        results[t.name], s = evaluate_task(lm, t, cfg)
        samples += s
    groups = {}
    for g in sorted({t.group for t in tasks if t.group}):
        members = [t.name for t in tasks if t.group == g]
        vals = [results[m]["value"] for m in members]
        ns = [results[m]["n"] for m in members]
        micro = float(np.average(vals, weights=ns))
        groups[g] = {"metric": "acc", "value": micro, "acc_macro": float(np.mean(vals)), "n": int(sum(ns)),
                     "subtasks": members, "stderr": float("nan")}
    cfg_d = asdict(cfg)
    return {"results": results, "groups": groups, "config": cfg_d,
            "model": {"name": getattr(lm, "name", "lm"), "num_params": getattr(lm, "num_params", None)}}, samples
