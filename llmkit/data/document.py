"""Documents and the text primitives every cleaning stage shares (survey §4.1.2).

Implements:
- `Document` (`id`, `text`, `source`, `metadata`): the unit that flows through every stage; extra
  fields of an input record are kept in `metadata` and written back unchanged;
- `Rejected`: a malformed input record with its reason code (bad_json, invalid_utf8, empty, ...);
- language-aware word splitting (`split_words`): Unicode letters/digits runs for space-delimited
  scripts, one token per character for scripts written without spaces (Han, Kana, Thai, Lao, Khmer,
  Myanmar) -- the anchors' English-only tokenisation was datatrove issue #135;
- sentence and paragraph splitting, and the CCNet normalisation used for dedup keys
  (lower-case, accents stripped, digits -> 0, punctuation removed).
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from typing import Any

import regex

# Scripts written without spaces between words: each character counts as one word (as the
# per-language tokenizers of datatrove PR #147 do for zh/ja/th).
_NOSPACE = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}"
WORD_RE = regex.compile(rf"[{_NOSPACE}]|[^\s{_NOSPACE}\p{{P}}\p{{S}}]+(?:['’][^\s{_NOSPACE}\p{{P}}\p{{S}}]+)*")
# Word tokens plus punctuation/symbol tokens ("..." kept whole), as word tokenizers emit them (spaCy/nltk);
# contractions split like spaCy's ("i'll" -> "i", "'ll"), punctuation one token per run of one character
# ('!"' -> '!', '"'; runs such as "..." or "==" whole; WikiText's "@-@" whole), so alphabetic-token ratios agree with datatrove's
TOKEN_RE = regex.compile(rf"[{_NOSPACE}]|[^\s{_NOSPACE}\p{{P}}\p{{S}}]+|['’]\p{{L}}+|@[-.,]@|…|\.{{2,}}|-{{2,}}|={{2,}}|\*{{2,}}|#{{2,}}|_{{2,}}|[\p{{P}}\p{{S}}]")
# A sentence ends at . ! ? (and their CJK forms) followed by space or end; keeps the terminator.
SENT_RE = regex.compile(r"[^.!?。！？\n]+(?:[.!?。！？]+['\"”’)\]]*|$)")
_PUNCT_RE = regex.compile(r"[\p{P}\p{S}]+")
_DIGIT_RE = regex.compile(r"\d")
_SPACE_RE = regex.compile(r"\s+")


@dataclass
class Document:
    id: str
    text: str
    source: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_record(self) -> dict:
        """The output JSON record: extra input fields first (they survive every stage), then ours."""
        rec = dict(self.metadata.get("_extra", {}))
        meta = {k: v for k, v in self.metadata.items() if k != "_extra"}
        rec.update(id=self.id, text=self.text, source=self.source)
        if meta:
            rec["metadata"] = meta
        return rec

    @classmethod
    def from_record(cls, rec: dict, source: str = "", fallback_id: str = "") -> "Document":
        """Inverse of `to_record`; `text` must be a str (the readers check that first)."""
        rec = dict(rec)
        text = rec.pop("text")
        doc_id = rec.pop("id", None)
        src = rec.pop("source", None) or source
        meta = rec.pop("metadata", None)
        meta = dict(meta) if isinstance(meta, dict) else ({} if meta is None else {"metadata": meta})
        if rec:
            meta["_extra"] = rec
        return cls(id=str(doc_id) if doc_id is not None else fallback_id, text=text, source=src, metadata=meta)


@dataclass
class Rejected:
    """A record that could not become a Document; goes to DIR/rejected/ with its reason."""
    reason: str
    where: str
    raw: str = ""
    detail: str = ""

    def to_record(self) -> dict:
        return {"reason": self.reason, "where": self.where, "detail": self.detail, "raw": self.raw[:2000]}


_LAST_SPLIT: list = [None, []]  # consecutive filters split the same text: remember the last one


def split_words(text: str) -> list[str]:
    """Words of any language: letter/digit runs (apostrophes inside), single chars for CJK/Thai."""
    if _LAST_SPLIT[0] is not text:
        _LAST_SPLIT[0], _LAST_SPLIT[1] = text, WORD_RE.findall(text)
    return list(_LAST_SPLIT[1])


_LAST_TOKENS: list = [None, []]


def split_tokens(text: str) -> list[str]:
    """Words and punctuation/symbol tokens (what Gopher's rules count, as datatrove's spaCy tokens)."""
    if _LAST_TOKENS[0] is not text:
        _LAST_TOKENS[0], _LAST_TOKENS[1] = text, TOKEN_RE.findall(text)
    return list(_LAST_TOKENS[1])


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in SENT_RE.findall(text) if s.strip()]


def split_paragraphs(text: str) -> list[str]:
    return [p for p in regex.split(r"\n\s*\n", text) if p.strip()]


def normalize_for_dedup(text: str) -> str:
    """CCNet `normalize_for_dedup`: lower-case, strip accents, digits -> 0, drop punctuation, squeeze spaces."""
    text = text.lower()
    if not text.isascii():  # accent stripping only where there can be accents (fast path for ASCII)
        text = unicodedata.normalize("NFD", text)
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
    text = _DIGIT_RE.sub("0", text)
    text = _PUNCT_RE.sub(" ", text)
    return _SPACE_RE.sub(" ", text).strip()
