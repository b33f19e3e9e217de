"""Data plumbing between a recipe and the trainer (survey §4.3): tokenizers for small runs, loaders, samples.

Implements:
- `char_tokenizer(text)`: a character-level tokenizer as a real `tokenizer.json` (WordLevel over single
  characters, fused on decode), so checkpoints of char-level runs load anywhere;
- `build_data(recipe_data, cfg, ...)`: the train/val loaders a recipe's `data:` section names:
  `{kind: text, path: FILE, val_fraction: 0.1, tokenizer: char|PATH}` (a text file split by position, e.g.
  tinyshakespeare: first 90% train, last 10% val), `{kind: tokens, path: DIR, val_fraction}` (shards written
  by `llmkit data tokenize`), or `{kind: texts}` with in-memory `texts=` (the demo); loaders are
  `llmkit.data.shards.BatchLoader` (sliced by rank/world_size, resumable);
- `sample_text(model, tokenizer, prompt, n)`: a short sample with the KV cache (temperature 0.8, top-k 50).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

EOS = "<|endoftext|>"


def char_tokenizer(text: str):
    import tokenizers
    from tokenizers import Regex, decoders, models, pre_tokenizers

    from ..tokenizer import Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(set(text)))}
    vocab[EOS] = len(vocab)
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([EOS])
    return Tokenizer(tok, eos_token=EOS)


def load_tokenizer(spec, text: str | None = None):
    if spec in (None, "char"):
        if text is None:
            raise ValueError("a char tokenizer is built from the training text; give data.path")
        return char_tokenizer(text)
    from ..tokenizer import Tokenizer

    return Tokenizer.load(spec)


def _split_text_dataset(ids: np.ndarray, eos_id: int, val_fraction: float):
    from ..data.shards import TokenDataset

    cut = int(len(ids) * (1 - val_fraction))
    mk = lambda a: TokenDataset(arrays=[a], doc_starts=np.array([0], np.int64), eos_id=eos_id)  # noqa: E731
    return mk(ids[:cut]), mk(ids[cut:])


def build_data(data: dict, cfg, *, texts: list[str] | None = None, tokenizer=None, rank: int = 0, world_size: int = 1,
               base_dir: str | Path | None = None):
    """(train_loader, val_loader, tokenizer) for a recipe's data section."""
    from ..data.shards import BatchLoader, TokenDataset, dataset_from_texts

    kind = data.get("kind", "text")
    vf = float(data.get("val_fraction", 0.1))
    if kind == "text":
        path = Path(data["path"]).expanduser()
        if not path.is_absolute() and base_dir is not None and not path.exists():
            path = Path(base_dir) / path
        if not path.exists():
            raise FileNotFoundError(f"data.path {path} does not exist; point the recipe at a text file "
                                    f"(override with data.path=FILE)")
        text = path.read_text(encoding="utf-8")
        tokenizer = tokenizer or load_tokenizer(data.get("tokenizer", "char"), text)
        ids = np.asarray(tokenizer.encode(text), dtype=np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32)
        train, val = _split_text_dataset(ids, tokenizer.eos_token_id, vf)
    elif kind == "tokens":
        train, val = TokenDataset(data["path"]).split(vf)
        if tokenizer is None and data.get("tokenizer"):
            tokenizer = load_tokenizer(data["tokenizer"])
    elif kind == "texts":
        if texts is None or tokenizer is None:
            raise ValueError("data.kind=texts needs texts= and tokenizer= from the caller")
        train, val = dataset_from_texts(texts, tokenizer).split(vf)
    else:
        raise ValueError(f"data.kind={kind!r} is unknown; use text, tokens or texts")
    doc = bool(data.get("document_mask", False))
    train_loader = BatchLoader(train, cfg.micro_batch_size, cfg.seq_len, seed=cfg.seed, rank=rank,
                               world_size=world_size, doc_info=doc)
    val_loader = BatchLoader(val, cfg.micro_batch_size, cfg.seq_len, seed=cfg.seed + 1, rank=rank,
                             world_size=world_size, doc_info=doc)
    return train_loader, val_loader, tokenizer


@torch.no_grad()
def sample_text(model, tokenizer, prompt: str, n_tokens: int, seed: int = 0, device="cpu",
                temperature: float = 0.8, top_k: int = 50) -> str:
    """A sample continuation (KV cache, temperature + top-k), with its own generator (no global RNG use)."""
    if getattr(getattr(model, "cfg", None), "arch", "decoder") == "encoder_decoder":
        return ""
    ids = tokenizer.encode(prompt) or [tokenizer.eos_token_id]
    g = torch.Generator(device="cpu").manual_seed(seed)
    was_training = model.training
    model.eval()
    max_len = min(len(ids) + n_tokens, model.cfg.max_seq_len)
    cache = model.new_cache(1, max_len)
    x = torch.tensor([ids], device=device)
    out = []
    for _ in range(max_len - len(ids)):
        logits = model(x, cache=cache)[0, -1].float().cpu() / temperature
        v, i = torch.topk(logits, min(top_k, logits.numel()))
        nxt = int(i[torch.multinomial(torch.softmax(v, -1), 1, generator=g)])
        out.append(nxt)
        x = torch.tensor([[nxt]], device=device)
    model.train(was_training)
    return prompt + tokenizer.decode(out)
