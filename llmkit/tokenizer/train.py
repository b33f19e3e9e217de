"""Tokenizer training (survey §4.1.2 "Tokenization": byte-level BPE, WordPiece, Unigram) on HF `tokenizers`.

Implements:
- byte-level BPE with GPT-2 pre-tokenisation (its regex inside `ByteLevel`) or Llama-3 pre-tokenisation (the
  Llama-3 / tiktoken cl100k regex split, then `ByteLevel` without regex): lossless, decode(encode(x)) == x;
- Unigram (T5 / SentencePiece style `Metaspace`, or byte-level) and WordPiece (BERT pre-tokeniser, [CLS]/[SEP]);
- special tokens (bos/eos/pad/unk and the chat template's tokens) as single ids, a named chat template
  (chatml, llama3) or a Jinja file;
- saved through `llmkit.tokenizer.Tokenizer` as tokenizer.json + tokenizer_config.json (loads in
  transformers.AutoTokenizer), plus manifest.json with the held-out bytes per token.

Normalisation choices (the survey warns NFKC can hurt, e.g. it rewrites full-width and compatibility characters):
byte-level BPE and Unigram apply no normaliser at all, so they are lossless; WordPiece uses BERT's normaliser
with case and accents kept (it still collapses whitespace, so it is not lossless).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from ..artifacts import write_manifest
from .core import Tokenizer

# Llama-3's pre-tokenisation regex (tiktoken cl100k_base): case-insensitive contractions, letters with one leading
# non-letter, numbers in groups of at most 3 digits, punctuation runs, newlines, other whitespace.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")

CHAT_TEMPLATES = {
    # ChatML (OpenAI, Qwen, SmolLM2): the template SmolLM2-Instruct ships, without its default system prompt
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
               "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
               "{% endif %}"),
    # Llama-3 header format
    "llama3": ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
               "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
}
CHAT_TOKENS = {"chatml": ["<|im_start|>", "<|im_end|>"],
               "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
# (bos, eos, pad, unk) per model type; GPT-2 uses one <|endoftext|> for bos and eos; BERT its bracketed tokens
ROLE_TOKENS = {
    "bpe": ("<|endoftext|>", "<|endoftext|>", "<|pad|>", None),
    "unigram": ("<|endoftext|>", "<|endoftext|>", "<|pad|>", "<unk>"),
    "wordpiece": ("[CLS]", "[SEP]", "[PAD]", "[UNK]"),
}
DEFAULT_PRETOKENIZER = {"bpe": "gpt2", "unigram": "metaspace", "wordpiece": "bert"}
HELDOUT_FRACTION = 0.02  # ~2% of the input bytes are held out to measure bytes per token
CHUNK_CHARS = 1 << 14  # documents are cut at line ends into ~16K-char chunks so single-file corpora have a held-out part


def build_pipeline(kind: str, pretokenizer: str | None = None) -> HFTokenizer:
    """An untrained tokenizers pipeline: model, normaliser, pre-tokeniser, decoder, post-processor."""
    pre = pretokenizer or DEFAULT_PRETOKENIZER.get(kind)
    if kind == "bpe":
        tok = HFTokenizer(models.BPE())
    elif kind == "unigram":
        tok = HFTokenizer(models.Unigram())
    elif kind == "wordpiece":
        tok = HFTokenizer(models.WordPiece(unk_token=ROLE_TOKENS["wordpiece"][3]))
    else:
        raise ValueError(f"unknown tokenizer type {kind!r}; use bpe, unigram or wordpiece")
    if pre == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre == "llama3":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    elif pre == "bert":
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=False,
                                                    lowercase=False)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
    else:
        raise ValueError(f"unknown pre-tokenizer {pre!r}; use gpt2, llama3, metaspace or bert")
    if pre in ("gpt2", "llama3"):
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _trainer(kind: str, pre: str, vocab_size: int, specials: list[str], min_frequency: int, unk: str | None):
    byte_level = pre in ("gpt2", "llama3")
    alphabet = pre_tokenizers.ByteLevel.alphabet() if byte_level else []  # all 256 bytes: nothing is ever unknown
    if kind == "bpe":
        return trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                   initial_alphabet=alphabet, show_progress=False)
    if kind == "unigram":
        return trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token=unk,
                                       initial_alphabet=alphabet, show_progress=False)
    return trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                     show_progress=False)


def iter_documents(texts_or_files: Iterable[str | Path], separator: str | None = None) -> Iterator[str]:
    """Texts given directly, or files read with llmkit.data.readers (txt, jsonl(.gz/.zst), json, parquet, ...).
    A `Path`, or a one-line string naming an existing file or folder, is read; any other string is a text.
    Malformed records are skipped (the cleaning pipeline is where they are reported)."""
    from ..data.readers import expand_inputs, read_any
    from ..data.document import Document

    for item in texts_or_files:
        if _is_path(item):
            for path, fmt in expand_inputs([str(item)]):
                for doc in read_any(path, fmt, separator=separator):
                    if isinstance(doc, Document):
                        yield doc.text
        else:
            yield item


def _is_path(item: str | Path) -> bool:
    return isinstance(item, Path) or ("\n" not in item and os.path.exists(item))  # exists() is False on OSError


def _chunks(text: str) -> Iterator[str]:
    """~CHUNK_CHARS pieces cut just after a newline (or hard cut when a line is longer)."""
    i = 0
    while i < len(text):
        j = i + CHUNK_CHARS
        if j < len(text):
            nl = text.rfind("\n", i, j)
            j = nl + 1 if nl > i else j
        yield text[i:j]
        i = j


class _HeldOut:
    """Splits a document stream into training text and a held-out sample: a chunk is held out whenever the
    held-out bytes are below `fraction` of all bytes seen so far (deterministic, streaming)."""

    def __init__(self, docs: Iterable[str], fraction: float = HELDOUT_FRACTION):
        self.docs, self.fraction, self.heldout, self.heldout_bytes, self.train_bytes = docs, fraction, [], 0, 0

    def __iter__(self) -> Iterator[str]:
        for doc in self.docs:
            for c in _chunks(doc):
                n = len(c.encode("utf-8"))
                if self.heldout_bytes < self.fraction * (self.heldout_bytes + self.train_bytes + n):
                    self.heldout.append(c)
                    self.heldout_bytes += n
                else:
                    self.train_bytes += n
                    yield c


def bytes_per_token(tok: Tokenizer | HFTokenizer, texts: list[str]) -> float:
    """UTF-8 bytes per token over `texts` (higher = better compression)."""
    hf = getattr(tok, "tok", tok)
    n_tok = sum(len(e.ids) for e in hf.encode_batch(texts, add_special_tokens=False))
    return sum(len(t.encode("utf-8")) for t in texts) / max(n_tok, 1)


def train_tokenizer(texts_or_files: Iterable[str | Path], out_dir: str | Path | None, vocab_size: int,
                    kind: str = "bpe", *, pretokenizer: str | None = None, special_tokens: list[str] | None = None,
                    chat_template: str | None = "chatml", min_frequency: int = 2, separator: str | None = None,
                    heldout: Iterable[str | Path] | None = None, command: list[str] | None = None) -> Tokenizer:
    """Train a tokenizer and (when out_dir is given) save it with a manifest; returns an llmkit `Tokenizer`.

    `heldout`: texts/files to measure bytes per token on; by default ~2% of the input (whole chunks) is held out.
    `chat_template`: "chatml", "llama3", a path to a Jinja file, or None; its special tokens are added.
    The result's `.stats` holds bytes_per_token, heldout_bytes, train_bytes and the vocabulary size.
    """
    pre = pretokenizer or DEFAULT_PRETOKENIZER.get(kind)
    bos, eos, pad, unk = ROLE_TOKENS.get(kind, (None,) * 4)
    template, chat_tokens = _template(chat_template)
    specials = list(dict.fromkeys(t for t in [unk, bos, eos, pad, *chat_tokens, *(special_tokens or [])] if t))
    if vocab_size <= len(specials) + (256 if pre in ("gpt2", "llama3") else 0):
        raise ValueError(f"vocab_size={vocab_size} leaves no room for merges after {len(specials)} special tokens "
                         f"and the 256-byte alphabet; use a larger --vocab-size")
    hf = build_pipeline(kind, pre)
    docs = iter_documents(texts_or_files, separator)
    stream = _HeldOut(docs, fraction=0.0 if heldout is not None else HELDOUT_FRACTION)
    hf.train_from_iterator(stream, _trainer(kind, pre, vocab_size, specials, min_frequency, unk))
    if stream.train_bytes == 0:
        raise ValueError("tokenizer training got no text: check the inputs (empty files, wrong --separator, "
                         "jsonl without a 'text' field)")
    if kind == "wordpiece":
        hf.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} $B:1 {eos}:1",
            special_tokens=[(bos, hf.token_to_id(bos)), (eos, hf.token_to_id(eos))])
    tok = Tokenizer(hf, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk, chat_template=template)
    held = list(iter_documents(heldout, separator)) if heldout is not None else stream.heldout
    tok.stats = {"type": kind, "pretokenizer": pre, "vocab_size": tok.vocab_size, "train_bytes": stream.train_bytes,
                 "heldout_bytes": sum(len(t.encode("utf-8")) for t in held),
                 "bytes_per_token": round(bytes_per_token(tok, held), 4) if held else None}
    if out_dir is not None:
        tok.save(out_dir)
        config = {"type": kind, "pretokenizer": pre, "vocab_size": vocab_size, "min_frequency": min_frequency,
                  "special_tokens": specials, "chat_template": chat_template, "separator": separator}
        parents = [p for p in _paths(texts_or_files)]
        write_manifest(out_dir, "tokenizer", parents=parents, config=config, command=command,
                       extra={"stats": tok.stats})
    return tok


def _template(name: str | None) -> tuple[str | None, list[str]]:
    if name is None or name == "none":
        return None, []
    if name in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[name], CHAT_TOKENS[name]
    p = Path(name)
    if not p.exists():
        raise ValueError(f"chat template {name!r}: not a known name ({', '.join(CHAT_TEMPLATES)}, none) "
                         f"nor a Jinja file")
    text = p.read_text()
    return text, [t for ts in CHAT_TOKENS.values() for t in ts if t in text]


def _paths(items) -> list[dict]:
    """Lineage for file inputs; in-memory texts are recorded by their hash."""
    out = []
    if not isinstance(items, (list, tuple)):
        return out
    texts = hashlib.sha256()
    n_texts = 0
    for it in items:
        if _is_path(it):
            out.append(Path(it))
        else:
            texts.update(it.encode("utf-8"))
            n_texts += 1
    if n_texts:
        out.append({"texts": n_texts, "sha256": texts.hexdigest()})
    return out
