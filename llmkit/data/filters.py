"""Heuristic quality filters: Gopher quality and repetition, C4, FineWeb (survey §4.1.2, statistic-based).

Implements (defaults are the anchors' thresholds, see shared/DATA_PIPELINES.md §1.2, which equal the
MassiveText paper's for Gopher and the TFDS/datatrove C4 code):
- `GopherQuality`: word count 50..100k, mean word length 3..10, '#' and ellipsis to word ratios
  <= 0.1, bullet lines <= 90%, ellipsis-ended lines <= 30%, >= 80% of words with a letter, >= 2
  stop words (per-language lists; the rule is skipped for a language without one);
- `GopherRepetition`: duplicate line/paragraph fractions and char fractions, top 2-4-gram char
  fractions, duplicated 5..10-gram char fractions;
- `C4Quality`: line-level (terminal punctuation, >= 3 words, word <= 1000 chars, "javascript",
  cookie/policy lines, citation markers stripped) and document-level (lorem ipsum, "{", >= 5
  sentences) -- it edits the text;
- `C4Paragraph`: >= 3 paragraphs whose 3 longest have >= 200 chars;
- `FineWebQuality`: terminal-punctuation line ratio >= 0.12, short-line ratio <= 0.67,
  duplicate-line chars <= 1%, newline/word ratio <= 0.3.
Tokens come from the language-aware `split_tokens` (letter/digit runs, CJK per character, contractions
and punctuation split as spaCy does), one regex pass shared by every rule: as in datatrove, word counts
and mean length use the non-symbol tokens, while ratios and n-grams use all tokens.
"""
from __future__ import annotations

import heapq

import numpy as np
import regex

from .document import Document, split_sentences, split_tokens
from .stage import Stage

STOP_WORDS = {  # Gopher's 8 English stop words; others are the same function words in each language
    "en": {"the", "be", "to", "of", "and", "that", "have", "with"},
    "de": {"der", "die", "und", "zu", "das", "mit", "von", "sein"},
    "fr": {"le", "la", "de", "et", "être", "que", "avoir", "avec"},
    "es": {"el", "la", "de", "y", "ser", "que", "haber", "con"},
    "it": {"il", "la", "di", "e", "essere", "che", "avere", "con"},
    "pt": {"o", "a", "de", "e", "ser", "que", "ter", "com"},
    "nl": {"de", "het", "en", "van", "zijn", "dat", "hebben", "met"},
}
END_PUNCT = (".", "?", "!", '"', "'")
POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
CITATION_RE = regex.compile(r"\[\d*\]|\[edit\]|\[citation needed\]", regex.I)
PARA_RE = regex.compile(r"\n{2,}")
LINES_RE = regex.compile(r"\n+")


def _lang(doc: Document) -> str:
    return str(doc.metadata.get("language", "en"))


class GopherQuality(Stage):
    """Gopher quality rules: 50..100k words, mean word length 3..10, symbol/bullet/ellipsis ratios, alpha tokens, stop words."""

    type = "gopher_quality"
    histogram_keys = ("n_words", "mean_word_len")

    def __init__(self, min_words=50, max_words=100_000, min_mean_word_len=3.0, max_mean_word_len=10.0,
                 max_hash_ratio=0.1, max_ellipsis_ratio=0.1, max_bullet_lines=0.9, max_ellipsis_lines=0.3,
                 min_alpha_words=0.8, min_stop_words=2, stop_words: dict | None = None, **kw):
        super().__init__(**kw)
        self.min_words, self.max_words = min_words, max_words
        self.min_mwl, self.max_mwl = min_mean_word_len, max_mean_word_len
        self.max_hash, self.max_ell = max_hash_ratio, max_ellipsis_ratio
        self.max_bullet, self.max_ell_lines = max_bullet_lines, max_ellipsis_lines
        self.min_alpha, self.min_stop = min_alpha_words, min_stop_words
        self.stop_words = {k: set(v) for k, v in (stop_words or STOP_WORDS).items()}

    def measure(self, doc):
        text = doc.text
        tokens = split_tokens(text)  # all tokens, punctuation included: the ratios' denominator (as datatrove)
        words = [t for t in tokens if t[0].isalnum() or any(c.isalnum() for c in t)]  # "non-symbol words"
        n, nt = max(len(words), 1), max(len(tokens), 1)
        lines = text.splitlines() or [""]
        stops = self.stop_words.get(_lang(doc))
        return {
            "n_words": len(words),
            "mean_word_len": sum(map(len, words)) / n,
            "hash_ratio": text.count("#") / nt,
            "ellipsis_ratio": (text.count("...") + text.count("…")) / nt,
            "bullet_lines": sum(ln.lstrip().startswith(("•", "-", "*")) for ln in lines) / len(lines),
            "ellipsis_lines": sum(ln.rstrip().endswith(("...", "…")) for ln in lines) / len(lines),
            "alpha_words": sum(1 for w in tokens if w.isalpha() or any(c.isalpha() for c in w)) / nt,
            "stop_words": -1 if stops is None else sum(w.lower() in stops for w in tokens),
        }

    def judge(self, s):
        if s["n_words"] < self.min_words:
            return "gopher_too_few_words"
        if s["n_words"] > self.max_words:
            return "gopher_too_many_words"
        if s["mean_word_len"] < self.min_mwl:
            return "gopher_short_mean_word"
        if s["mean_word_len"] > self.max_mwl:
            return "gopher_long_mean_word"
        if s["hash_ratio"] > self.max_hash:
            return "gopher_too_many_hashes"
        if s["ellipsis_ratio"] > self.max_ell:
            return "gopher_too_many_ellipsis"
        if s["bullet_lines"] > self.max_bullet:
            return "gopher_too_many_bullets"
        if s["ellipsis_lines"] > self.max_ell_lines:
            return "gopher_too_many_end_ellipsis"
        if s["alpha_words"] < self.min_alpha:
            return "gopher_below_alpha"
        if s["stop_words"] != -1 and s["stop_words"] < self.min_stop:
            return "gopher_few_stop_words"
        return None


def _dup_stats(items: list[str]) -> tuple[int, int]:
    """(# duplicate elements, # chars in duplicates), the first occurrence not counted."""
    seen: set[str] = set()
    n = chars = 0
    for x in items:
        if x in seen:
            n += 1
            chars += len(x)
        else:
            seen.add(x)
    return n, chars


_MULT = np.uint64(0x9E3779B97F4A7C15)


def _ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """64-bit key of every word n-gram (ids are per-document word ids; collisions ~2^-64)."""
    m = len(ids) - n + 1
    if m <= 0:
        return np.zeros(0, np.uint64)
    h = np.zeros(m, np.uint64)
    for j in range(n):
        h = h * _MULT + ids[j: j + m]
    return h


def _top_ngram_chars(keys: np.ndarray, n: int, cum: np.ndarray) -> int:
    """Chars of the most frequent n-gram (joined with spaces) times its count; ties go to the
    earliest n-gram, as `Counter.most_common` in datatrove."""
    if len(keys) == 0:
        return 0
    _, first, counts = np.unique(keys, return_index=True, return_counts=True)
    best = counts.max()
    i = int(first[counts == best].min())
    return int(cum[i + n] - cum[i] + n - 1) * int(best)


def _dup_ngram_chars(keys: np.ndarray, n: int, cum: np.ndarray) -> int:
    """Chars in duplicated n-grams, non-overlapping scan (datatrove `find_all_duplicate`)."""
    if len(keys) == 0 or len(np.unique(keys)) == len(keys):
        return 0  # fast path: no n-gram repeats at all (most documents)
    seen: set[int] = set()
    chars = i = 0
    klist, m = keys.tolist(), len(keys)
    while i < m:
        g = klist[i]
        if g in seen:
            chars += int(cum[i + n] - cum[i])
            i += n
        else:
            seen.add(g)
            i += 1
    return chars


class GopherRepetition(Stage):
    """Gopher repetition: duplicate line/paragraph fractions, top 2-4-gram and duplicated 5-10-gram char fractions."""

    type = "gopher_repetition"
    histogram_keys = ("dup_line_frac",)

    def __init__(self, dup_line_frac=0.3, dup_para_frac=0.3, dup_line_char_frac=0.2, dup_para_char_frac=0.2,
                 top_ngrams=((2, 0.2), (3, 0.18), (4, 0.16)),
                 dup_ngrams=((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)), **kw):
        super().__init__(**kw)
        self.limits = {"dup_para_frac": dup_para_frac, "dup_para_char_frac": dup_para_char_frac,
                       "dup_line_frac": dup_line_frac, "dup_line_char_frac": dup_line_char_frac}
        self.limits.update({f"top_{n}gram": f for n, f in top_ngrams})
        self.limits.update({f"dup_{n}gram": f for n, f in dup_ngrams})
        self.top_ngrams, self.dup_ngrams = [n for n, _ in top_ngrams], [n for n, _ in dup_ngrams]

    def measure(self, doc):
        text = doc.text
        total = max(len(text), 1)
        paras = PARA_RE.split(text.strip())
        lines = LINES_RE.split(text)
        pn, pc = _dup_stats(paras)
        ln, lc = _dup_stats(lines)
        s = {"dup_para_frac": pn / max(len(paras), 1), "dup_para_char_frac": pc / total,
             "dup_line_frac": ln / max(len(lines), 1), "dup_line_char_frac": lc / total}
        words = split_tokens(text)  # n-grams over tokens, punctuation included, as datatrove's
        # word ids only need to be equal for equal words within this document: the builtin str hash
        ids = np.fromiter(map(hash, words), np.int64, len(words)).view(np.uint64)
        cum = np.concatenate([[0], np.cumsum([len(w) for w in words], dtype=np.int64)])
        for n in self.top_ngrams:
            s[f"top_{n}gram"] = _top_ngram_chars(_ngram_hashes(ids, n), n, cum) / total
        for n in self.dup_ngrams:
            s[f"dup_{n}gram"] = _dup_ngram_chars(_ngram_hashes(ids, n), n, cum) / total
        return s

    def judge(self, s):
        for k, limit in self.limits.items():
            if s[k] > limit:
                return f"gopher_{k}"
        return None


class C4Quality(Stage):
    """C4 rules; edits the text (drops lines), so in tag mode only the document-level verdict is tagged."""

    type = "c4_quality"
    histogram_keys = ("n_sentences",)

    def __init__(self, terminal_punct=True, min_words_per_line=3, max_word_len=1000, min_sentences=5,
                 lorem_ipsum=True, javascript=True, curly_bracket=True, policy=True, citations=True, **kw):
        super().__init__(**kw)
        self.terminal_punct, self.min_wpl, self.max_word_len = terminal_punct, min_words_per_line, max_word_len
        self.min_sentences, self.lorem, self.js = min_sentences, lorem_ipsum, javascript
        self.curly, self.policy, self.citations = curly_bracket, policy, citations

    def _line_verdict(self, line: str) -> tuple[str, str | None]:
        """(cleaned line, None) to keep, ('', reason) to drop the line, (line, 'doc:reason') to drop the doc."""
        words = line.split()
        if self.max_word_len and any(len(w) > self.max_word_len for w in words):
            return "", "too_long_word"
        if self.citations:
            line = CITATION_RE.sub("", line)
        if self.terminal_punct and (not line.endswith(END_PUNCT) or line.endswith("...")):
            return "", "no_terminal_punct"
        if len(words) < self.min_wpl:
            return "", "too_few_words"
        low = line.lower()
        if self.lorem and "lorem ipsum" in low:
            return line, "doc:c4_lorem_ipsum"
        if self.js and "javascript" in low:
            return "", "javascript"
        if self.curly and "{" in line:
            return line, "doc:c4_curly_bracket"
        if self.policy and any(p in low for p in POLICY):
            return "", "policy"
        return line, None

    def measure(self, doc):
        kept, n_sent, dropped = [], 0, {}
        for line in doc.text.splitlines():
            line, why = self._line_verdict(line.strip())
            if why is None:
                kept.append(line)
                n_sent += len(split_sentences(line))
            elif why.startswith("doc:"):
                return {"n_sentences": n_sent, "doc_reason": why[4:], "kept": kept, "lines_dropped": dropped}
            else:
                dropped[why] = dropped.get(why, 0) + 1
        return {"n_sentences": n_sent, "doc_reason": None, "kept": kept, "lines_dropped": dropped}

    def judge(self, s):
        if s.get("doc_reason"):
            return s["doc_reason"]
        return "c4_too_few_sentences" if s["n_sentences"] < self.min_sentences else None

    def apply(self, doc):
        s = self.measure(doc)
        self.stats.score("n_sentences", s["n_sentences"])
        for why, n in s["lines_dropped"].items():
            self.stats.count(f"lines_{why}", n)
        reason = self.judge(s)
        if self.mode == "tag":
            doc.metadata.setdefault("attrs", {})[self.name] = {"n_sentences": s["n_sentences"], "reason": reason}
            return None
        if reason is None:
            doc.text = "\n".join(s["kept"]).strip()
        return reason


class C4Paragraph(Stage):
    """C4 paragraph rule: >= 3 lines, the 3 longest >= 200 chars."""

    type = "c4_paragraph"

    def __init__(self, min_paragraphs=3, min_paragraph_len=200, **kw):
        super().__init__(**kw)
        self.min_paragraphs, self.min_len = min_paragraphs, min_paragraph_len

    def measure(self, doc):
        lens = [len(p) for p in doc.text.split("\n")]
        top = heapq.nlargest(self.min_paragraphs, lens)
        return {"n_paragraphs": len(lens), "min_top_len": min(top) if top else 0}

    def judge(self, s):
        if s["n_paragraphs"] < self.min_paragraphs or s["min_top_len"] < self.min_len:
            return "c4_few_long_paragraphs"
        return None


class FineWebQuality(Stage):
    """FineWeb rules: terminal-punct lines >= 12%, short lines <= 67%, dup-line chars <= 1%, newlines/words <= 0.3."""

    type = "fineweb_quality"
    histogram_keys = ("line_punct_ratio", "short_line_ratio")

    def __init__(self, line_punct_thr=0.12, line_punct_exclude_zero=False, short_line_thr=0.67,
                 short_line_length=30, char_duplicates_ratio=0.01, new_line_ratio=0.3, **kw):
        super().__init__(**kw)
        self.punct_thr, self.exclude_zero = line_punct_thr, line_punct_exclude_zero
        self.short_thr, self.short_len = short_line_thr, short_line_length
        self.dup_thr, self.nl_thr = char_duplicates_ratio, new_line_ratio

    def measure(self, doc):
        text = doc.text
        lines = [ln for ln in text.split("\n") if ln.strip()]
        if not lines:
            return {"empty": True}
        n = len(lines)
        return {
            "line_punct_ratio": sum(ln.endswith(END_PUNCT) for ln in lines) / n,
            "short_line_ratio": sum(len(ln) <= self.short_len for ln in lines) / n,
            "char_dup_ratio": _dup_stats(lines)[1] / max(len(text.replace("\n", "")), 1),
            "list_ratio": text.count("\n") / max(len(split_tokens(text)), 1),
        }

    def judge(self, s):
        if s.get("empty"):
            return "fineweb_empty"
        r = s["line_punct_ratio"]
        if r < self.punct_thr and not (r == 0 and self.exclude_zero):
            return "fineweb_line_punct_ratio"
        if s["short_line_ratio"] > self.short_thr:
            return "fineweb_short_line_ratio"
        if s["char_dup_ratio"] > self.dup_thr:
            return "fineweb_char_dup_ratio"
        if s["list_ratio"] > self.nl_thr:
            return "fineweb_list_ratio"
        return None


# Named presets: the anchors' filter chains (FineWeb: datatrove examples/fineweb.py order).
PRESETS = {
    "gopher": [{"type": "gopher_repetition"}, {"type": "gopher_quality"}],
    "c4": [{"type": "c4_quality"}],
    "fineweb": [{"type": "gopher_repetition"}, {"type": "gopher_quality"},
                {"type": "c4_quality", "terminal_punct": False}, {"type": "fineweb_quality"}],
}
