"""From an adaptation recipe to a Trainer run (survey §5): base model, PEFT, data source, objective, outputs.

A recipe is YAML with sections `base` (what `llmkit.load` accepts: a checkpoint dir, HF dir, .gguf or an
alias such as smollm2-135m-instruct), `data`, `method` (objective settings), `peft` and `train` (TrainConfig).
`key=value` overrides address them (`method.beta=0.2`, `peft.r=16`; a bare key is `train.`).
`build(stage, recipe)` returns the model, the trainer's data iterator and loss_fn; `finish` writes `final/`
(a llmkit checkpoint, LoRA merged) and `adapter/` (PEFT format), each with a manifest.json naming the base
model and the data files as parents.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from ..train.config import RECIPE_DIR, TrainConfig, parse_value
from . import instruct_data as idata
from .sft import SFTLoader, tokenize_chat

SECTIONS = ("description", "base", "data", "method", "peft", "train")


def load_recipe(spec: str | Path, overrides: list[str] | None = None) -> dict:
    p = Path(spec)
    if not p.exists():
        p = RECIPE_DIR / f"{spec}.yaml"
    if not p.exists():
        names = sorted(q.stem for q in RECIPE_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"recipe {spec!r} is neither a file nor a shipped recipe; shipped: {names}")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML ({e})") from e
    unknown = sorted(set(d) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{p}: unknown recipe sections {unknown}; use {list(SECTIONS)}")
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value (e.g. method.beta=0.2, peft.r=16, lr=1e-4)")
        key, value = item.split("=", 1)
        parts = key.split(".")
        if parts[0] not in SECTIONS:
            parts = ["train", *parts]
        node = d
        for q in parts[:-1]:
            node = node.setdefault(q, {})
        node[parts[-1]] = parse_value(value)
    if not d.get("base"):
        raise ValueError(f"{p}: `base:` is required (a checkpoint dir, HF dir, .gguf file or alias)")
    d["_path"] = str(p)
    TrainConfig.from_dict(d.get("train") or {})  # validate early, naming the file
    return d


def resolve(path: str, recipe: dict) -> Path:
    """Data paths: as given, else relative to the recipe file, else under ../shared/data of the checkout."""
    cands = [Path(path), Path(recipe["_path"]).parent / path, Path(__file__).resolve().parents[3] / "shared" / "data" / path]
    for c in cands:
        if c.exists():
            return c
    raise FileNotFoundError(f"data path {path!r} not found (tried {[str(c) for c in cands]})")


def load_base(recipe: dict):
    from .. import load

    return load(recipe["base"])


def apply_peft(model, peft: dict | None) -> None:
    peft = peft or {}
    kind = peft.get("kind", "none")
    if kind == "none":
        return
    from .peft import apply_lora
    from .quantize import nf4_model

    if kind == "qlora":
        nf4_model(model, targets=peft.get("targets", "all") if peft.get("targets") != "all" else None)
    elif kind != "lora":
        raise ValueError(f"peft.kind={kind!r}: choose none, lora or qlora")
    apply_lora(model, peft.get("r", 8), peft.get("alpha", 16), peft.get("dropout", 0.0), peft.get("targets", "all"),
               peft.get("rslora", False))


# ---------------------------------------------------------------------------------------------- data
def chats(data: dict, recipe: dict) -> tuple[list[list[dict]], list[str]]:
    """Conversations for SFT and the files they came from."""
    kind, limit = data.get("kind", "chat_jsonl"), data.get("limit")
    if kind == "arithmetic":
        skip = set(data.get("exclude") or [])
        probs = [p for p in idata_arith(data) if p["question"] not in skip]
        return [[{"role": "user", "content": p["question"]}, {"role": "assistant", "content": p["solution"]}]
                for p in probs], []
    path = resolve(data["path"], recipe)
    if kind == "alpaca":
        rows = json.loads(path.read_text())[:limit]
        return [idata.alpaca_messages(r) for r in rows], [str(path)]
    rows = idata.read_jsonl(path)[:limit]
    if kind == "gsm8k":
        return [idata.gsm8k_messages(r) for r in rows], [str(path)]
    if kind == "chat_jsonl":
        return [r["messages"] for r in rows], [str(path)]
    raise ValueError(f"data.kind={kind!r} for sft: choose arithmetic, alpaca, gsm8k or chat_jsonl")


def idata_arith(data: dict) -> list[dict]:
    from .rewards import arithmetic_problems

    return arithmetic_problems(data.get("n", 2000), data.get("seed", 0), tuple(data.get("n_terms", (2, 3))),
                               data.get("max_operand", 9), data.get("ops", "+-*"))


def preference_pairs(data: dict, recipe: dict, tok) -> tuple[list[dict], list[str]]:
    kind, limit, max_len = data.get("kind", "hh_rlhf"), data.get("limit"), data.get("max_len", 256)
    files: list[str] = []
    if kind == "hh_rlhf":
        rows = []
        for f in data.get("paths", [data.get("path")]):
            path = resolve(f, recipe)
            files.append(str(path))
            rows += [idata.hh_pairs(r["chosen"], r["rejected"]) for r in idata.read_jsonl(path)]
    elif kind == "pairs_jsonl":
        path = resolve(data["path"], recipe)
        files.append(str(path))
        rows = idata.read_jsonl(path)
    elif kind == "arithmetic":  # chosen = the worked solution, rejected = the same steps with a wrong answer
        rows = [{"prompt": p["question"], "chosen": " " + p["solution"],
                 "rejected": " " + p["solution"].replace(f"The answer is {p['answer']}", f"The answer is {p['answer'] + 1}")}
                for p in idata_arith(data)]
    else:
        raise ValueError(f"data.kind={kind!r} for preferences: choose hh_rlhf, pairs_jsonl or arithmetic")
    rows = rows[:limit]
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    out = []
    for r in rows:
        p = tok.encode(r["prompt"])[-max_len // 2:]  # keep the end of long dialogues: the last turn matters
        c, j = tok.encode(r["chosen"]) + eos, tok.encode(r["rejected"]) + eos
        out.append({"prompt_ids": p, "chosen_ids": c[: max_len - len(p)], "rejected_ids": j[: max_len - len(p)]})
    return out, files


class PairLoader:
    """Resumable, epoch-shuffled stream of preference batches: rows [chosen..., rejected...], or with
    shared_prompt one [prompt | chosen | rejected] row per pair (DPO: the prompt runs once)."""

    def __init__(self, pairs: list[dict], batch_size: int, pad_id: int, seed: int = 0, shared_prompt: bool = False):
        if not pairs:
            raise ValueError("no preference pairs: check data.path and data.kind")
        self.pairs, self.batch_size, self.pad_id, self.seed = pairs, batch_size, pad_id, seed
        self.shared_prompt = shared_prompt
        self.epoch, self.index = 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.index = s["epoch"], s["index"]

    def __iter__(self):
        import random

        from .dpo import collate_preferences, collate_shared_prompt

        collate = collate_shared_prompt if self.shared_prompt else collate_preferences
        while True:
            order = list(range(len(self.pairs)))
            random.Random(self.seed + self.epoch).shuffle(order)
            while self.index + self.batch_size <= len(order):
                idx = order[self.index: self.index + self.batch_size]
                self.index += self.batch_size
                yield collate([self.pairs[i] for i in idx], self.pad_id)
            self.epoch, self.index = self.epoch + 1, 0


def split(items: list, val_fraction: float, seed: int = 0) -> tuple[list, list]:
    import random

    items = list(items)
    random.Random(seed).shuffle(items)
    n_val = int(len(items) * val_fraction)
    return items[n_val:], items[:n_val]


def sft_data(recipe: dict, tok, cfg: TrainConfig):
    data = recipe.get("data") or {}
    convs, files = chats(data, recipe)
    max_len = data.get("max_len", cfg.seq_len)
    exs = [tokenize_chat(tok, c, max_len) for c in convs]
    exs = [e for e in exs if any(lab != -100 for lab in e["labels"])]
    train, val = split(exs, data.get("val_fraction", 0.0), cfg.seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    packed = data.get("packed", False)
    mk = lambda xs: SFTLoader(xs, cfg.micro_batch_size, pad, max_len if packed else None, packed, cfg.seed)  # noqa: E731
    return mk(train), (mk(val) if val else None), files
