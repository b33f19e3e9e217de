"""Supervised instruction tuning (survey §5.1.2, §5.2.3 step 1): tokenised chats with role masks, packing, batches.

Implements:
- `tokenize_chat`: a conversation (system / user / assistant / tool turns) rendered with the tokenizer's
  chat template, with loss only on assistant turns (one forward pass per conversation, survey §5.1.2
  "efficient multi-turn training"); the assistant spans come from rendering growing prefixes of the chat,
  so any Jinja template works, and the tokens are exactly those of the full rendering;
- `tokenize_pair`: prompt -> response (+EOS) with loss on the response only;
- `pack`: first-fit packing of examples into rows of `seq_len` with `doc_ids` and per-document position
  resets, so the trainer's block-diagonal mask makes packed losses equal unpacked ones;
- `collate`: right-padded (or packed) batches in the trainer's layout: input_ids, labels (shifted,
  -100 = no loss), positions, doc_ids;
- `SFTLoader`: an epoch-shuffled, resumable (state_dict) stream of batches for `llmkit.train.Trainer`,
  whose default `lm_loss` is then the SFT loss.
"""
from __future__ import annotations

import random

import torch

from .logprobs import IGNORE

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    import jinja2

    return jinja2.Template(CHATML).render(messages=messages, add_generation_prompt=add_generation_prompt)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def tokenize_chat(tokenizer, messages: list[dict], max_len: int | None = None, train_roles=("assistant",)) -> dict:
    """{input_ids, labels} with labels = input_ids on the trained roles' turns and -100 elsewhere."""
    for m in messages:
        if m.get("role") not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"chat message role {m.get('role')!r} is not one of system/user/assistant/tool")
    ids, labels, done = [], [], ""
    for i, m in enumerate(messages):
        full = _render(tokenizer, messages[: i + 1], False)
        if m["role"] in train_roles:
            head = _render(tokenizer, messages[:i], True)  # ends with the assistant header
            if not head.startswith(done) or not full.startswith(head):
                raise ValueError("the chat template does not render prefixes consistently; cannot mask by role")
            seg = _encode(tokenizer, head[len(done):])
            ids += seg
            labels += [IGNORE] * len(seg)
            seg = _encode(tokenizer, full[len(head):])
            ids += seg
            labels += seg
        else:
            if not full.startswith(done):
                raise ValueError("the chat template does not render prefixes consistently; cannot mask by role")
            seg = _encode(tokenizer, full[len(done):])
            ids += seg
            labels += [IGNORE] * len(seg)
        done = full
    if max_len:
        ids, labels = ids[:max_len], labels[:max_len]
    return {"input_ids": ids, "labels": labels}


def tokenize_pair(tokenizer, prompt: str, response: str, eos_id: int | None = None, max_len: int | None = None) -> dict:
    p, r = _encode(tokenizer, prompt), _encode(tokenizer, response)
    eos = getattr(tokenizer, "eos_token_id", None) if eos_id is None else eos_id
    r = r + ([eos] if eos is not None else [])
    ids, labels = p + r, [IGNORE] * len(p) + r
    if max_len:
        ids, labels = ids[:max_len], labels[:max_len]
    return {"input_ids": ids, "labels": labels}


def lm_example(ids: list[int]) -> dict:
    """A pre-training document mixed into instruction tuning (OPT-IML): every token carries loss."""
    return {"input_ids": list(ids), "labels": list(ids)}


def mix_pretraining(instruct: list[dict], documents: list[list[int]], ratio: float, seed: int = 0) -> list[dict]:
    """Instruction examples plus round(ratio * len(instruct)) pre-training documents, shuffled together."""
    rng = random.Random(seed)
    n = round(ratio * len(instruct))
    docs = [lm_example(documents[rng.randrange(len(documents))]) for _ in range(n)] if n else []
    out = list(instruct) + docs
    rng.shuffle(out)
    return out


def pack(examples: list[dict], seq_len: int) -> list[list[dict]]:
    """First-fit-decreasing bins of examples whose lengths sum to <= seq_len."""
    bins: list[list[dict]] = []
    room: list[int] = []
    for ex in sorted(examples, key=lambda e: -len(e["input_ids"])):
        n = len(ex["input_ids"])
        if n > seq_len:
            raise ValueError(f"an example has {n} tokens > seq_len={seq_len}; truncate it (max_len) first")
        for i, r in enumerate(room):
            if r >= n:
                bins[i].append(ex)
                room[i] -= n
                break
        else:
            bins.append([ex])
            room.append(seq_len - n)
    return bins


def _row(docs: list[dict]) -> tuple[list[int], list[int], list[int], list[int]]:
    ids, labels, pos, doc = [], [], [], []
    for d, ex in enumerate(docs):
        n = len(ex["input_ids"])
        ids += list(ex["input_ids"])
        # the label at t is the token at t+1 of the same document; a document's last token predicts nothing
        labels += list(ex["labels"][1:]) + [IGNORE]
        pos += list(range(n))
        doc += [d] * n
    return ids, labels, pos, doc


def collate(rows: list, pad_id: int = 0, seq_len: int | None = None) -> dict:
    """Rows of examples (a dict, or a list of dicts to pack into one row) -> the trainer's batch."""
    rows = [r if isinstance(r, list) else [r] for r in rows]
    built = [_row(r) for r in rows]
    T = seq_len or max(len(b[0]) for b in built)
    out = {k: torch.full((len(rows), T), v, dtype=torch.long)
           for k, v in (("input_ids", pad_id), ("labels", IGNORE), ("positions", 0), ("doc_ids", -1))}
    for i, (ids, labels, pos, doc) in enumerate(built):
        n = min(len(ids), T)
        for k, v in (("input_ids", ids), ("labels", labels), ("positions", pos), ("doc_ids", doc)):
            out[k][i, :n] = torch.tensor(v[:n])
    # padding keys form their own "document" per slot so they attend only to themselves (no NaN rows)
    pad = out["doc_ids"] < 0
    out["doc_ids"][pad] = (1000000 + torch.arange(T)).expand(len(rows), T)[pad]
    if all(len(r) == 1 for r in rows):
        # one document per row: plain causal attention on right padding is exact, and SDPA's fast path applies
        del out["doc_ids"]
    return out


class SFTLoader:
    """Infinite, resumable stream of SFT batches: shuffled each epoch, optionally packed into `seq_len` rows."""

    def __init__(self, examples: list[dict], batch_size: int, pad_id: int = 0, seq_len: int | None = None,
                 packed: bool = False, seed: int = 0):
        if not examples:
            raise ValueError("SFT needs at least one tokenised example; check the data path and format")
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id
        self.seq_len, self.packed, self.seed = seq_len, packed, seed
        self.epoch, self.index = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list:
        rng = random.Random(self.seed + self.epoch)
        if self.packed:
            units = pack(self.examples, self.seq_len)
        else:
            units = [[e] for e in self.examples]
        rng.shuffle(units)
        return units

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.index = s["epoch"], s["index"]
        self._order = self._make_order()

    def __iter__(self):
        while True:
            if self.index + self.batch_size > len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._make_order()
            rows = self._order[self.index: self.index + self.batch_size]
            self.index += self.batch_size
            yield collate(rows, self.pad_id, self.seq_len if self.packed else None)


def per_example_losses(model, batch: dict) -> list[float]:
    """Mean token loss of each document of a batch (rows x doc_ids), for packed-vs-unpacked checks."""
    from ..train.objectives import forward

    logits = forward(model, batch).float()
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"], ignore_index=IGNORE, reduction="none")
    docs = batch.get("doc_ids", torch.zeros_like(batch["labels"]))
    out = []
    for b in range(ce.shape[0]):
        for d in docs[b].unique().tolist():
            sel = (docs[b] == d) & (batch["labels"][b] != IGNORE)
            if sel.any():
                out.append(ce[b][sel].mean().item())
    return out
