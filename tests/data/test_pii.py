"""PII detection on a labelled fixture set with look-alike negatives (checklist B11)."""
from __future__ import annotations

import pytest

from llmkit.data.document import Document
from llmkit.data.pii import PIIRedaction, find_pii, iban_ok, luhn_ok

# (text, expected kinds in order); negatives are look-alikes that must not be flagged
LABELLED = [
    ("Write to john.doe@example.com for details.", ["email"]),
    ("Mail: a_b+tag@sub.mail.co.uk.", ["email"]),
    ("Call +1 415-555-2671 after noon.", ["phone"]),
    ("UK office: +44 20 7946 0958", ["phone"]),
    ("US line (415) 555-2671 works", ["phone"]),
    ("or dial 555-123-4567 now", ["phone"]),
    ("Paris: 01 42 68 53 00 (landline)", ["phone"]),
    ("Server at 8.8.8.8 answered", ["ip"]),
    ("IPv6 2001:4860:4860::8888 is Google", ["ip"]),
    ("Card 4111 1111 1111 1111 expires", ["credit_card"]),
    ("Pay to GB82 WEST 1234 5698 7654 32 today", ["iban"]),
    ("DE89370400440532013000 is an IBAN", ["iban"]),
    ("mail x@y.org and call +49 30 901820", ["email", "phone"]),
    # look-alike negatives
    ("Upgrade to version 1.2.3.4 of the tool", []),
    ("Released v10.0.0.1 yesterday", []),
    ("Meeting on 2023-10-12 and 12/10/2023", []),
    ("Router at 192.168.1.1 and 10.0.0.7 (private)", []),
    ("Loopback 127.0.0.1 is local", []),
    ("Card-like 4111 1111 1111 1112 fails Luhn", []),
    ("Pi is 3.14159265358979 roughly", []),
    ("ISBN 978-3-16-148410-0 of the book", []),
    ("Population 1,234,567,890 people", []),
    ("Score was 12-10 in overtime", []),
    ("Use @decorator and user@localhost in code", []),
    ("The year 1999 and room 101", []),
    ("Not an iban: GB82 WEST 1234 5698 7654 33", []),
]


@pytest.mark.parametrize("text,kinds", LABELLED)
def test_labelled_fixtures(text, kinds):
    assert [k for _, _, k in find_pii(text)] == kinds


def test_precision_recall_on_fixture_set():
    tp = fp = fn = 0
    for text, kinds in LABELLED:
        got = [k for _, _, k in find_pii(text)]
        tp += sum(min(got.count(k), kinds.count(k)) for k in set(kinds))
        fp += max(0, len(got) - len(kinds))
        fn += max(0, len(kinds) - len(got))
    assert fp == 0 and fn == 0 and tp == 14


def test_private_ips_only_when_configured():
    text = "Router at 192.168.1.1 answers"
    assert find_pii(text) == []
    assert [k for *_, k in find_pii(text, private_ips=True)] == ["ip"]


def test_checksums():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("GB82WEST12345698765432") and not iban_ok("GB82WEST12345698765433")


def test_policies_replace_mask_drop():
    text = "Reach jane@corp.com or +1 415-555-2671."
    d = Document("1", text)
    PIIRedaction()(d)
    assert d.text == "Reach <EMAIL> or <PHONE>." and d.metadata["pii_redacted"] == 2
    d = Document("2", text)
    PIIRedaction(policy="mask")(d)
    assert d.text == "Reach ****@****.*** or +* ***-***-****."
    st = PIIRedaction(drop_above=2)
    assert st(Document("3", text)) is None and st.stats.removed == {"pii_too_many": 1}
    assert st(Document("4", "only jane@corp.com here")) is not None
    with pytest.raises(ValueError, match="unknown kinds"):
        PIIRedaction(kinds=["ssn"])
