"""Task registry (survey §7): names -> Task objects reading local upstream files.

`get_tasks("hellaswag,arc_easy,mmlu_anatomy,mmlu,gsm8k", data_dir)` returns Task objects; `mmlu` expands to its
57 subjects (the harness adds the macro average). Data lives under `data_dir` (default: $LLMKIT_DATA, else
`../shared/data` beside the repository) in the layouts listed in its README; a closed-book QA set is
`cbqa:/path/to/file.jsonl`; synthetic tasks take `:N` for their item count (`arithmetic:50`); `NAME@hub` reads
the hub copy through `datasets.load_dataset` (tasks/hub.py).
"""
from __future__ import annotations

import os
from pathlib import Path

from .base import GenTask, MCTask, PerplexityTask, Task, TaskDataError, fewshot_prefix
from .code import CodeTask, humaneval
from .generative import closed_book_qa, gsm8k, lambada, wikitext
from .mc import arc, boolq, hellaswag, mmlu, mmlu_subjects, piqa, truthfulqa, winogrande
from .symbolic import symbolic_task

SIMPLE = {
    "hellaswag": hellaswag, "arc_easy": lambda d: arc(d, "easy"), "arc_challenge": lambda d: arc(d, "challenge"),
    "piqa": piqa, "boolq": boolq, "winogrande": winogrande, "truthfulqa_mc1": lambda d: truthfulqa(d, "mc1"),
    "truthfulqa_mc2": lambda d: truthfulqa(d, "mc2"), "gsm8k": gsm8k, "lambada": lambada, "wikitext": wikitext,
}
SYNTHETIC = ("last_letter", "coin_flip", "arithmetic")


def default_data_dir() -> Path:
    env = os.environ.get("LLMKIT_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[3].parent / "shared" / "data"


def task_names(data_dir: Path | None = None) -> list[str]:
    d = Path(data_dir or default_data_dir())
    subjects = mmlu_subjects(d) if (d / "mmlu").exists() else []
    return sorted(SIMPLE) + list(SYNTHETIC) + ["humaneval", "mmlu"] + [f"mmlu_{s}" for s in subjects] + ["cbqa:PATH"]


def get_task(name: str, data_dir: Path | None = None) -> list[Task]:
    d = Path(data_dir or default_data_dir())
    if name.endswith("@hub"):
        from .hub import hub_task

        return [hub_task(name, d)]
    base, _, arg = name.partition(":")
    if base in SIMPLE:
        return [SIMPLE[base](d)]
    if base in SYNTHETIC:
        return [symbolic_task(base, n=int(arg or 100))]
    if base == "humaneval":
        return [humaneval(arg or None)]
    if base == "cbqa":
        if not arg:
            raise TaskDataError("cbqa needs a file: --tasks cbqa:/path/to/questions.jsonl")
        return [closed_book_qa(Path(arg))]
    if base == "mmlu":
        return [mmlu(d, s) for s in mmlu_subjects(d)]
    if base.startswith("mmlu_"):
        return [mmlu(d, base[len("mmlu_"):])]
    raise TaskDataError(f"unknown task {name!r}; known tasks: {', '.join(task_names(d)[:20])}, ...")


def get_tasks(names: str | list[str], data_dir: Path | None = None) -> list[Task]:
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else names
    return [t for n in names if n for t in get_task(n, data_dir)]


__all__ = ["Task", "MCTask", "GenTask", "PerplexityTask", "CodeTask", "TaskDataError", "fewshot_prefix",
           "get_task", "get_tasks", "task_names", "default_data_dir"]
