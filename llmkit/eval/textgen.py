"""Conditional text generation metrics (survey §7.1.1: translation BLEU, summarisation ROUGE).

Implements, dependency-free:
- `corpus_bleu(hyps, refs)`: BLEU-4 (Papineni et al. 2002) with sacrebleu's default '13a' tokenisation,
  clipped n-gram precisions, brevity penalty from the corpus lengths (closest reference), no smoothing —
  sacrebleu's `corpus_bleu` defaults, so the numbers match it;
- `rouge_n(hyp, ref, n)` and `rouge_l(hyp, ref)`: F-measures as in Google's rouge-score (lower case,
  non-alphanumerics to spaces, no stemming).
The survey's warning stands: these correlate poorly with human judgement of LLM outputs.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence


def tokenize_13a(line: str) -> list[str]:
    """sacrebleu's default tokenizer (mteval-v13a): punctuation split off, dashes between digits kept."""
    s = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in s:
        s = s.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    s = f" {s} "
    s = re.sub(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])", r" \1 ", s)
    s = re.sub(r"([^0-9])([\.,])", r"\1 \2 ", s)
    s = re.sub(r"([\.,])([^0-9])", r" \1 \2", s)
    s = re.sub(r"([0-9])(-)", r"\1 \2 ", s)
    return s.split()


def _ngrams(toks: list[str], n: int) -> Counter:
    return Counter(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))


def corpus_bleu(hyps: Sequence[str], refs: Sequence[Sequence[str]] | Sequence[str], max_n: int = 4) -> float:
    """refs: one reference string per hypothesis, or a list of references per hypothesis. Returns 0..100."""
    refs = [[r] if isinstance(r, str) else list(r) for r in refs]
    match, total = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for h, rs in zip(hyps, refs):
        ht = tokenize_13a(h)
        rts = [tokenize_13a(r) for r in rs]
        hyp_len += len(ht)
        ref_len += min((abs(len(r) - len(ht)), len(r)) for r in rts)[1]
        for n in range(1, max_n + 1):
            hc = _ngrams(ht, n)
            best = Counter()
            for r in rts:
                best |= _ngrams(r, n)
            match[n - 1] += sum(min(c, best[g]) for g, c in hc.items())
            total[n - 1] += max(len(ht) - n + 1, 0)
    if min(match) == 0:
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(match, total)) / max_n
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / max(hyp_len, 1))
    return 100.0 * bp * math.exp(log_p)


def _rouge_tokens(s: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", s.lower()).split()


def _f(overlap: int, n_hyp: int, n_ref: int) -> float:
    if overlap == 0:
        return 0.0
    p, r = overlap / n_hyp, overlap / n_ref
    return 2 * p * r / (p + r)


def rouge_n(hyp: str, ref: str, n: int = 1) -> float:
    h, r = _ngrams(_rouge_tokens(hyp), n), _ngrams(_rouge_tokens(ref), n)
    return _f(sum((h & r).values()), sum(h.values()), sum(r.values()))


def rouge_l(hyp: str, ref: str) -> float:
    h, r = _rouge_tokens(hyp), _rouge_tokens(ref)
    if not h or not r:
        return 0.0
    prev = [0] * (len(r) + 1)
    for a in h:  # longest common subsequence, one row at a time
        cur = [0]
        for j, b in enumerate(r):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    return _f(prev[-1], len(h), len(r))
