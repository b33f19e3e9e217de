"""Privacy reduction: rule-based PII detection and redaction (survey §4.1.2, "privacy reduction").

Implements `PIIRedaction` and `find_pii(text)` for: e-mail addresses; phone numbers (international
"+CC ..." and North-American / grouped national forms, 9-15 digits, never a date); IPv4 addresses
(public only by default, as datatrove's PIIFormatter; private/loopback too with `private_ips`) and
IPv6; credit-card numbers (13-19 digits passing the Luhn check); IBANs (ISO 13616 mod-97 check).
Look-alikes that are not PII: version strings ("v1.2.3.4", "version 10.0.0.1"), dates, ordinary
numbers, private IPs unless configured, card-like numbers failing Luhn.
Policies: `replace` (a type tag such as <EMAIL>), `mask` (letters/digits -> '*'), and `drop_above`:
drop a document with at least N hits (dolma drops pages with >= 6).
Not covered: names and postal addresses (they need NER, e.g. Presidio with a spaCy model).
"""
from __future__ import annotations

import ipaddress

import regex

from .stage import Stage

EMAIL_RE = regex.compile(r"(?<![\w.+-])[\w.+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,24}(?![\w-])")
IPV4_RE = regex.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)(?![\w.]*\d)")
IPV6_RE = regex.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![\w:])|(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){1,6}:(?:[0-9A-Fa-f]{1,4}:?){1,6}(?![\w:])")
PHONE_RE = regex.compile(
    r"(?<![\w+./-])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}"
    r"|\(\d{3}\)[ .-]?\d{3}[ .-]?\d{4}|\d{3}[.-]\d{3}[.-]\d{4}|0\d{1,4}[ -]\d{3,4}[ -]\d{3,4}|0\d(?:[ .]\d{2}){4})(?![\w./-]*\d)")
CARD_RE = regex.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
IBAN_RE = regex.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b")
DATE_RE = regex.compile(r"^\d{4}[-./]\d{1,2}[-./]\d{1,2}$|^\d{1,2}[-./]\d{1,2}[-./]\d{2,4}$")
VERSION_CONTEXT_RE = regex.compile(r"\b(?:v|version|release|build|ver\.?)\s*$", regex.I)
TAGS = {"email": "<EMAIL>", "phone": "<PHONE>", "ip": "<IP>", "credit_card": "<CREDIT_CARD>", "iban": "<IBAN>"}


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(s: str) -> bool:
    s = s.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _ip_ok(text: str, m, private_ips: bool) -> bool:
    if VERSION_CONTEXT_RE.search(text[max(0, m.start() - 12): m.start()]):
        return False
    try:
        ip = ipaddress.ip_address(m.group())
    except ValueError:
        return False
    return private_ips or ip.is_global


def find_pii(text: str, kinds=tuple(TAGS), private_ips: bool = False) -> list[tuple[int, int, str]]:
    """Non-overlapping (start, end, kind) spans, earliest and longest first."""
    spans: list[tuple[int, int, str]] = []
    if "email" in kinds and "@" in text:
        spans += [(m.start(), m.end(), "email") for m in EMAIL_RE.finditer(text)]
    if "iban" in kinds:
        spans += [(m.start(), m.end(), "iban") for m in IBAN_RE.finditer(text) if iban_ok(m.group())]
    if "credit_card" in kinds:
        for m in CARD_RE.finditer(text):
            digits = regex.sub(r"\D", "", m.group())
            if 13 <= len(digits) <= 19 and luhn_ok(digits):
                spans.append((m.start(), m.end(), "credit_card"))
    if "ip" in kinds:
        spans += [(m.start(), m.end(), "ip") for m in IPV4_RE.finditer(text) if _ip_ok(text, m, private_ips)]
        if ":" in text:
            spans += [(m.start(), m.end(), "ip") for m in IPV6_RE.finditer(text) if _ip_ok(text, m, private_ips)]
    if "phone" in kinds:
        for m in PHONE_RE.finditer(text):
            s = m.group()
            n = sum(c.isdigit() for c in s)
            if 9 <= n <= 15 and not DATE_RE.match(s) and not VERSION_CONTEXT_RE.search(text[max(0, m.start() - 12): m.start()]):
                spans.append((m.start(), m.end(), "phone"))
    spans.sort(key=lambda s: (s[0], -(s[1] - s[0])))
    out, end = [], -1
    for s in spans:
        if s[0] >= end:
            out.append(s)
            end = s[1]
    return out


def redact(text: str, spans, policy: str = "replace", tags: dict | None = None) -> str:
    tags = tags or TAGS
    parts, prev = [], 0
    for start, end, kind in spans:
        parts.append(text[prev:start])
        piece = text[start:end]
        parts.append(tags[kind] if policy == "replace" else regex.sub(r"[\p{L}\p{N}]", "*", piece))
        prev = end
    parts.append(text[prev:])
    return "".join(parts)


class PIIRedaction(Stage):
    """Redacts e-mails, phones, public IPs, Luhn-valid cards, IBANs (replace/mask; drop_above N hits)."""

    type = "pii"
    histogram_keys = ("pii_hits",)

    def __init__(self, policy: str = "replace", kinds=tuple(TAGS), private_ips: bool = False,
                 drop_above: int | None = None, tags: dict | None = None, **kw):
        super().__init__(**kw)
        if policy not in ("replace", "mask"):
            raise ValueError(f"pii stage: policy must be 'replace' or 'mask' (use drop_above: N to drop), not {policy!r}")
        unknown = set(kinds) - set(TAGS)
        if unknown:
            raise ValueError(f"pii stage: unknown kinds {sorted(unknown)}; choose from {sorted(TAGS)}")
        self.policy, self.kinds, self.private_ips = policy, tuple(kinds), private_ips
        self.drop_above, self.tags = drop_above, {**TAGS, **(tags or {})}

    def apply(self, doc):
        spans = find_pii(doc.text, self.kinds, self.private_ips)
        self.stats.score("pii_hits", len(spans))
        for _, _, kind in spans:
            self.stats.count(f"redacted_{kind}")
        if self.drop_above is not None and len(spans) >= self.drop_above:
            if self.mode == "tag":
                doc.metadata.setdefault("attrs", {})[self.name] = {"pii_hits": len(spans), "reason": "pii_too_many"}
                return None
            return "pii_too_many"
        if spans:
            doc.text = redact(doc.text, spans, self.policy, self.tags)
            doc.metadata["pii_redacted"] = len(spans)
        return None
