"""Task kinds of survey §7.1 and the few-shot prompt layout they share.

Implements:
- `MCTask`: multiple choice scored by log-likelihood; each choice is a (context, continuation) request, so the
  usual form (one context, k continuations) and WinoGrande's partial scoring (k contexts, one continuation)
  are the same thing; metrics `acc` (summed log p) and `acc_norm` (log p per character, lm-eval's rule);
- `GenTask`: generation + answer extraction + a scoring function;
- `PerplexityTask`: rolling log-likelihood of whole documents (token/word perplexity, bits per byte);
- `fewshot_prefix`: description + k demos `text + delimiter + target` joined by a blank line (lm-eval's layout).
Readers raise `TaskDataError` naming the file and what is wrong.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence


class TaskDataError(ValueError):
    """A task file that cannot be read; the message names the file and the problem."""


def read_jsonl(path: Path, required: Sequence[str] = ()) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise TaskDataError(f"{path}: file not found; pass --data-dir pointing at the folder that holds it")
    docs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskDataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            missing = [k for k in required if k not in d]
            if missing:
                raise TaskDataError(f"{path}:{n}: missing field(s) {missing}; expected {list(required)}")
            docs.append(d)
    return docs


@dataclass
class Task:
    name: str
    kind: str = "mc"
    description: str = ""  # prepended once before the demos (MMLU's subject line)
    fewshot_delimiter: str = "\n\n"
    target_delimiter: str = " "
    default_fewshot: int = 0
    group: str | None = None  # tasks in a group get a macro average (MMLU subjects)

    def docs(self) -> list[dict]:
        raise NotImplementedError

    def fewshot_docs(self) -> list[dict]:
        """Demonstration pool; by default the evaluation docs (the demo itself is excluded per query)."""
        return self.docs()

    def doc_to_text(self, doc: dict) -> str:
        raise NotImplementedError

    def doc_to_target(self, doc: dict) -> str:
        raise NotImplementedError

    def demo(self, doc: dict) -> str:
        return self.doc_to_text(doc) + self.target_delimiter + self.doc_to_target(doc)


def fewshot_prefix(task: Task, demos: Sequence[dict], render: Callable[[dict], str] | None = None) -> str:
    render = render or task.demo
    return task.description + "".join(render(d) + task.fewshot_delimiter for d in demos)


@dataclass
class MCTask(Task):
    loader: Callable[[], list[dict]] | None = None
    fewshot_loader: Callable[[], list[dict]] | None = None
    text_fn: Callable[[dict], str] = lambda d: d["query"]
    choices_fn: Callable[[dict], list[str]] = lambda d: d["choices"]
    gold_fn: Callable[[dict], int] = lambda d: int(d["gold"])
    contexts_fn: Callable[[dict], list[str]] | None = None  # partial scoring: one context per choice
    multi_true: Callable[[dict], list[int]] | None = None  # TruthfulQA MC2: indices of true choices

    def docs(self):
        return self.loader()

    def fewshot_docs(self):
        return self.fewshot_loader() if self.fewshot_loader else self.docs()

    def doc_to_text(self, doc):
        if self.contexts_fn:  # partial scoring has no single query; the first option stands for it in retrieval
            return self.contexts_fn(doc)[0]
        return self.text_fn(doc)

    def doc_to_target(self, doc):
        if self.contexts_fn:
            return doc["continuation"]
        return self.choices_fn(doc)[self.gold_fn(doc)]

    def demo(self, doc):
        if self.contexts_fn:  # the demo shows the correct filled-in sentence
            return self.contexts_fn(doc)[self.gold_fn(doc)] + self.target_delimiter + doc["continuation"]
        return super().demo(doc)

    def requests(self, doc: dict, prefix: str = "") -> list[tuple[str, str]]:
        if self.contexts_fn:
            return [(prefix + c, self.target_delimiter + doc["continuation"]) for c in self.contexts_fn(doc)]
        ctx = prefix + self.doc_to_text(doc)
        return [(ctx, self.target_delimiter + c) for c in self.choices_fn(doc)]

    def norm_lengths(self, doc: dict) -> list[int]:
        """Characters per choice for acc_norm (lm-eval divides by len(choice))."""
        if self.contexts_fn:
            return [len(doc["continuation"])] * len(self.contexts_fn(doc))
        return [len(c) for c in self.choices_fn(doc)]


@dataclass
class GenTask(Task):
    kind: str = "gen"
    loader: Callable[[], list[dict]] | None = None
    fewshot_loader: Callable[[], list[dict]] | None = None
    text_fn: Callable[[dict], str] = lambda d: d["question"]
    target_fn: Callable[[dict], str] = lambda d: d["answer"]
    answer_fn: Callable[[dict], str] = lambda d: d["answer"]  # the gold final answer
    extract_fn: Callable[[str], str | None] = lambda s: s.strip()
    score_fn: Callable[[str | None, dict], dict[str, float]] | None = None
    stop: list[str] = field(default_factory=lambda: ["\n\n", "Question:"])
    max_new_tokens: int = 256
    cot_demos: str | None = None  # few-shot chain-of-thought exemplars used with --cot
    cot_style: str = "qa"

    def docs(self):
        return self.loader()

    def fewshot_docs(self):
        return self.fewshot_loader() if self.fewshot_loader else self.docs()

    def doc_to_text(self, doc):
        return self.text_fn(doc)

    def doc_to_target(self, doc):
        return self.target_fn(doc)

    def score(self, text: str, doc: dict) -> dict[str, float]:
        """Metrics of one generated text (the task's score_fn sees the raw text; by default the extracted
        answer must equal the gold one, numerically for numbers)."""
        if self.score_fn:
            return self.score_fn(text, doc)
        from ..metrics import answers_match

        return {"exact_match": float(answers_match(self.extract_fn(text), self.answer_fn(doc)))}


@dataclass
class PerplexityTask(Task):
    kind: str = "ppl"
    loader: Callable[[], list[str]] | None = None
    stride: int | None = None

    def docs(self):
        return [{"text": t} for t in self.loader()]
