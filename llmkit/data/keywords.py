"""Keyword-based filtering and line-level boilerplate removal (survey §4.1.2, keyword-based).

Implements:
- `KeywordFilter`: a word list (inline or one-per-line files, e.g. the LDNOOBW bad-word lists C4
  uses, or a toxicity lexicon) matched on whole words, case-insensitively, in any script; a document
  is dropped when it has >= `max_hits` hits or the hit fraction of its words is >= `max_fraction`
  (C4: any bad word drops the page, i.e. max_hits=1);
- `BoilerplateLines`: removes lines matching boilerplate patterns (cookie banners, "all rights
  reserved", share/subscribe/login prompts, navigation crumbs, HTML remnants) and optionally drops the
  whole document when more than `max_removed_frac` of its characters were boilerplate (RefinedWeb's
  line-wise corrections drop a document above 5%).
"""
from __future__ import annotations

from pathlib import Path

import regex

from .document import split_words
from .stage import Stage

BOILERPLATE = [
    r"\b(?:we|this (?:site|website)) uses? cookies\b", r"\baccept (?:all )?cookies\b", r"\ball rights reserved\b",
    r"^\s*(?:share|tweet|like|follow us)(?: on| this)?\b.{0,40}$", r"\bsubscribe to our newsletter\b",
    r"^\s*(?:log ?in|sign ?in|sign up|register)\s*(?:[|/·]\s*(?:log ?in|sign ?in|sign up|register)\s*)*$",
    r"\bclick here\b", r"^\s*(?:home|menu|search|skip to (?:main )?content)\s*(?:[>|»/·]\s*\w[\w ]{0,30})*$",
    r"</?(?:div|span|script|style|a|p|br)\b[^>]*>", r"^\s*copyright\s*(?:©|\(c\))?\s*\d{4}",
    r"\bterms of (?:use|service)\b", r"\bprivacy policy\b", r"^\s*(?:read more|continue reading|back to top)\W*$",
]


class KeywordFilter(Stage):
    """Drops documents with >= max_hits listed words/phrases (or a word fraction >= max_fraction)."""

    type = "keywords"
    histogram_keys = ("keyword_hits",)

    def __init__(self, words: list[str] = (), files: list[str] = (), max_hits: int = 1,
                 max_fraction: float | None = None, **kw):
        super().__init__(**kw)
        vocab = {w.strip().lower() for w in words if w.strip()}
        for f in files:
            if not Path(f).exists():
                raise FileNotFoundError(f"keywords: word list {f} not found")
            vocab |= {ln.strip().lower() for ln in Path(f).read_text(encoding="utf-8").splitlines() if ln.strip()}
        if not vocab:
            raise ValueError("keywords: give `words` or `files` (one word or phrase per line)")
        self.single = {w for w in vocab if " " not in w}
        phrases = sorted((w for w in vocab if " " in w), key=len, reverse=True)
        self.phrase_re = regex.compile(r"\b(?:" + "|".join(regex.escape(p) for p in phrases) + r")\b") if phrases else None
        self.max_hits, self.max_fraction = max_hits, max_fraction

    def measure(self, doc):
        low = doc.text.lower()
        words = split_words(low)
        hits = sum(w in self.single for w in words)
        if self.phrase_re is not None:
            hits += len(self.phrase_re.findall(low))
        return {"keyword_hits": hits, "keyword_fraction": hits / max(len(words), 1)}

    def judge(self, s):
        if self.max_hits is not None and s["keyword_hits"] >= self.max_hits:
            return "keyword_hits"
        if self.max_fraction is not None and s["keyword_fraction"] >= self.max_fraction:
            return "keyword_fraction"
        return None


class BoilerplateLines(Stage):
    """Removes boilerplate lines (cookie/legal/share/nav); optionally drops docs with too much of it."""

    type = "boilerplate"

    def __init__(self, patterns: list[str] | None = None, extra_patterns: list[str] = (),
                 max_removed_frac: float | None = None, **kw):
        super().__init__(**kw)
        pats = list(BOILERPLATE if patterns is None else patterns) + list(extra_patterns)
        self.re = regex.compile("|".join(f"(?:{p})" for p in pats), regex.I | regex.M)
        self.max_removed_frac = max_removed_frac

    def apply(self, doc):
        lines = doc.text.split("\n")
        kept = [ln for ln in lines if not self.re.search(ln)]
        if len(kept) == len(lines):
            return None
        removed = sum(map(len, lines)) - sum(map(len, kept))
        frac = removed / max(len(doc.text), 1)
        self.stats.count("lines_removed", len(lines) - len(kept))
        self.stats.score("boilerplate_frac", frac)
        if self.max_removed_frac is not None and frac > self.max_removed_frac:
            if self.mode == "tag":
                doc.metadata.setdefault("attrs", {})[self.name] = {"boilerplate_frac": frac, "reason": "boilerplate_too_much"}
                return None
            return "boilerplate_too_much"
        if self.mode != "tag":
            doc.text = "\n".join(kept).strip()
        return "boilerplate_empty" if not doc.text.strip() else None
