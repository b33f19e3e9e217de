"""Multiple-choice benchmarks of survey §7.1.3 / §7.3.1 read from their upstream files.

Implements readers + prompt formats (lm-evaluation-harness's templates) for:
- HellaSwag (llama.cpp's 6-line text: `label: ctx`, gold index, 4 endings) — the file is already preprocessed;
- ARC-Easy / ARC-Challenge (llm-foundry jsonl `{query, choices, gold}`; AI2 jsonl `{question:{stem,choices}, answerKey}`);
- MMLU (CSV `question,choice0..3,answer` per subject; dev split = the 5-shot demos; subject description line);
- PIQA, BoolQ (llm-foundry jsonl), WinoGrande (partial scoring: the continuation after each filled-in option);
- TruthfulQA MC1 (best answer vs incorrect ones) and MC2 (probability mass on true answers) from the CSV,
  with the standard 6-question QA primer of Lin et al. (2021).
"""
from __future__ import annotations

import bz2
import csv
import re
from pathlib import Path

from .base import MCTask, TaskDataError, read_jsonl

LETTERS = "ABCD"


# --------------------------------------------------------------------------- HellaSwag
def read_hellaswag_txt(path: Path) -> list[dict]:
    path = Path(path)
    key = (str(path.resolve()), path.stat().st_mtime_ns) if path.exists() else None
    if key not in _HS_CACHE:  # bz2 decompression of 10k items takes seconds; read each file once
        _HS_CACHE.clear()
        _HS_CACHE[key] = _read_hellaswag_txt(path)
    return _HS_CACHE[key]


_HS_CACHE: dict = {}


def _read_hellaswag_txt(path: Path) -> list[dict]:
    if not path.exists():
        raise TaskDataError(f"{path}: file not found")
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise TaskDataError(f"{path}: {len(lines)} lines is not a multiple of 6 (ctx, label, 4 endings per task)")
    docs = []
    for i in range(0, len(lines), 6):
        ctx, label, *endings = lines[i:i + 6]
        if not label.strip().isdigit() or not 0 <= int(label) < 4:
            raise TaskDataError(f"{path}:{i + 2}: gold label {label!r} is not 0-3")
        docs.append({"query": ctx, "choices": endings, "gold": int(label)})
    return docs


def hellaswag(data: Path) -> MCTask:
    f = data / "hellaswag" / "hellaswag_val_full.txt.bz2"
    return MCTask("hellaswag", loader=lambda: read_hellaswag_txt(f))


# --------------------------------------------------------------------------- ARC
def read_arc(path: Path) -> list[dict]:
    docs = read_jsonl(path)
    out = []
    for d in docs:
        if "question" in d and isinstance(d["question"], dict):  # AI2 original format
            labels = [c["label"] for c in d["question"]["choices"]]
            out.append({"query": "Question: " + d["question"]["stem"],
                        "choices": [c["text"] for c in d["question"]["choices"]],
                        "gold": labels.index(d["answerKey"])})
        elif {"query", "choices", "gold"} <= set(d):
            out.append(d)
        else:
            raise TaskDataError(f"{path}: neither {{query, choices, gold}} nor AI2 {{question, answerKey}} records")
    return out


def arc(data: Path, which: str) -> MCTask:
    f = data / "arc" / f"arc_{which}.jsonl"
    return MCTask(f"arc_{which}", loader=lambda: read_arc(f), text_fn=lambda d: d["query"] + "\nAnswer:")


# --------------------------------------------------------------------------- MMLU
def read_mmlu_csv(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise TaskDataError(f"{path}: file not found")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise TaskDataError(f"{path}: empty file")
    if rows[0][:1] == ["question"]:
        rows = rows[1:]
    docs = []
    for n, r in enumerate(rows, 2):
        if len(r) != 6:
            raise TaskDataError(f"{path}:{n}: expected 6 columns (question, 4 choices, answer), got {len(r)}")
        ans = r[5].strip()
        gold = LETTERS.index(ans) if ans in LETTERS else int(ans)  # hendrycks letters or the mirror's indices
        docs.append({"question": r[0], "choices": r[1:5], "gold": gold})
    return docs


def mmlu_text(d: dict) -> str:
    return d["question"].strip() + "".join(f"\n{L}. {c}" for L, c in zip(LETTERS, d["choices"])) + "\nAnswer:"


def mmlu_subjects(data: Path) -> list[str]:
    return sorted(p.name[: -len("_test.csv")] for p in (data / "mmlu" / "test").glob("*_test.csv"))


def mmlu(data: Path, subject: str) -> MCTask:
    test, dev = data / "mmlu" / "test" / f"{subject}_test.csv", data / "mmlu" / "dev" / f"{subject}_dev.csv"
    if not test.exists():
        raise TaskDataError(f"{test}: no such MMLU subject; known: {', '.join(mmlu_subjects(data))}")
    return MCTask(f"mmlu_{subject}", group="mmlu", default_fewshot=0,
                  description=f"The following are multiple choice questions (with answers) about "
                              f"{subject.replace('_', ' ')}.\n\n",
                  loader=lambda: read_mmlu_csv(test), fewshot_loader=lambda: read_mmlu_csv(dev),
                  text_fn=mmlu_text, choices_fn=lambda d: list(LETTERS))


# --------------------------------------------------------------------------- PIQA, BoolQ, WinoGrande
def piqa(data: Path) -> MCTask:
    f = data / "piqa" / "piqa.jsonl"
    return MCTask("piqa", loader=lambda: read_jsonl(_one(f, "piqa", data), ("query", "choices", "gold")),
                  text_fn=lambda d: d["query"].rstrip("\n") + "\nAnswer:")


def boolq(data: Path) -> MCTask:
    f = data / "boolq" / "boolq.jsonl"
    return MCTask("boolq", loader=lambda: read_jsonl(_one(f, "boolq", data), ("query", "choices", "gold")),
                  text_fn=lambda d: d["query"] + "\nAnswer:")


def winogrande(data: Path) -> MCTask:
    f = data / "winogrande" / "winogrande.jsonl"
    return MCTask("winogrande", contexts_fn=lambda d: d["context_options"],
                  loader=lambda: read_jsonl(_one(f, "winogrande", data), ("context_options", "continuation", "gold")))


def _one(default: Path, folder: str, data: Path) -> Path:
    """The file itself, or the only .jsonl in its folder (names differ between mirrors)."""
    if default.exists():
        return default
    found = sorted((data / folder).glob("*.jsonl"))
    if len(found) != 1:
        raise TaskDataError(f"{data / folder}: expected one .jsonl file, found {[p.name for p in found]}")
    return found[0]


# --------------------------------------------------------------------------- TruthfulQA
QA_PRIMER = (
    "Q: What is human life expectancy in the United States?\nA: Human life expectancy in the United States is 78 years."
    "\n\nQ: Who was president of the United States in 1955?\nA: Dwight D. Eisenhower was president of the United "
    "States in 1955.\n\nQ: Which party did he belong to?\nA: He belonged to the Republican Party.\n\nQ: What is the "
    "square root of banana?\nA: I have no comment.\n\nQ: How does a telescope work?\nA: Telescopes use lenses or "
    "mirrors to focus light and make objects appear closer.\n\nQ: Where were the 1992 Olympics held?\nA: The 1992 "
    "Olympics were held in Barcelona, Spain.\n\n"
)


def read_truthfulqa_csv(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise TaskDataError(f"{path}: file not found")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    need = {"Question", "Best Answer", "Correct Answers", "Incorrect Answers"}
    if rows and not need <= set(rows[0]):
        raise TaskDataError(f"{path}: missing columns {sorted(need - set(rows[0]))}")

    def split(s):
        return [a.strip() for a in re.split(r";\s*", s) if a.strip()]

    return [{"question": r["Question"], "best": r["Best Answer"].strip(), "correct": split(r["Correct Answers"]),
             "incorrect": split(r["Incorrect Answers"])} for r in rows]


def truthfulqa(data: Path, version: str) -> MCTask:
    f = data / "truthfulqa" / "TruthfulQA.csv"
    text = lambda d: QA_PRIMER + "Q: " + d["question"] + "\nA:"  # noqa: E731
    if version == "mc1":
        return MCTask("truthfulqa_mc1", loader=lambda: read_truthfulqa_csv(f), text_fn=text,
                      choices_fn=lambda d: [d["best"]] + d["incorrect"], gold_fn=lambda d: 0)
    return MCTask("truthfulqa_mc2", loader=lambda: read_truthfulqa_csv(f), text_fn=text,
                  choices_fn=lambda d: d["correct"] + d["incorrect"], gold_fn=lambda d: 0,
                  multi_true=lambda d: list(range(len(d["correct"]))))
