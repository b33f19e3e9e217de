"""Tasks from `datasets` hub names through the real loader (`datasets.load_dataset`), survey §7.3.1.

Implements `hub_task(name)` for `--tasks hellaswag@hub,arc_easy@hub,arc_challenge@hub,gsm8k@hub,mmlu_<subject>@hub`:
the hub copies (Rowan/hellaswag, allenai/ai2_arc, openai/gsm8k, cais/mmlu) are converted record by record into
the same documents the local readers produce, so prompts and scoring are shared. HellaSwag gets lm-eval's
preprocessing (` [title]` -> `. `, bracketed tags dropped, double spaces squeezed; ctx_b capitalised).
Needs network or a populated HF cache (HF_DATASETS_OFFLINE=1 then reads the cache only).
"""
from __future__ import annotations

import re

from .base import MCTask, TaskDataError

HUB = {  # task -> (dataset path, config, split)
    "hellaswag": ("Rowan/hellaswag", None, "validation"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test"),
    "gsm8k": ("openai/gsm8k", "main", "test"),
    "mmlu": ("cais/mmlu", None, "test"),
}


def load_records(path: str, config: str | None, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise TaskDataError("hub tasks need the `datasets` package: pip install datasets") from None
    try:
        return [dict(r) for r in datasets.load_dataset(path, config, split=split)]
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError)
        raise TaskDataError(f"datasets.load_dataset({path!r}, {config!r}, split={split!r}) failed: {e}; "
                            "without network, use the local files (drop '@hub')") from None


def _hs_pre(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_doc(r: dict) -> dict:
    ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
    return {"query": _hs_pre(r["activity_label"] + ": " + ctx), "choices": [_hs_pre(e) for e in r["endings"]],
            "gold": int(r["label"])}


def arc_doc(r: dict) -> dict:
    labels = list(r["choices"]["label"])
    key = {"1": "A", "2": "B", "3": "C", "4": "D", "5": "E"}.get(r["answerKey"], r["answerKey"])
    labels = [{"1": "A", "2": "B", "3": "C", "4": "D", "5": "E"}.get(x, x) for x in labels]
    return {"query": "Question: " + r["question"], "choices": list(r["choices"]["text"]), "gold": labels.index(key)}


def mmlu_doc(r: dict) -> dict:
    return {"question": r["question"], "choices": list(r["choices"]), "gold": int(r["answer"])}


def hub_task(name: str, data_dir=None):
    from .generative import gsm8k
    from .mc import arc, hellaswag, mmlu_text

    base = name.removesuffix("@hub")
    if base == "hellaswag":
        t = hellaswag(data_dir)
        t.loader = lambda: [hellaswag_doc(r) for r in load_records(*HUB["hellaswag"])]
    elif base in ("arc_easy", "arc_challenge"):
        t = arc(data_dir, base.split("_")[1])
        t.loader = lambda: [arc_doc(r) for r in load_records(*HUB[base])]
    elif base == "gsm8k":
        t = gsm8k(data_dir)
        t.loader = lambda: load_records(*HUB["gsm8k"])
        t.fewshot_loader = lambda: load_records("openai/gsm8k", "main", "train")
    elif base.startswith("mmlu_"):
        s = base[len("mmlu_"):]
        t = MCTask(f"mmlu_{s}", group="mmlu", text_fn=mmlu_text, choices_fn=lambda d: list("ABCD"),
                   description=f"The following are multiple choice questions (with answers) about {s.replace('_', ' ')}.\n\n",
                   loader=lambda: [mmlu_doc(r) for r in load_records("cais/mmlu", s, "test")],
                   fewshot_loader=lambda: [mmlu_doc(r) for r in load_records("cais/mmlu", s, "dev")])
    else:
        raise TaskDataError(f"no hub mapping for {name!r}; hub tasks: {', '.join(k + '@hub' for k in HUB)}")
    t.name = base
    return t
