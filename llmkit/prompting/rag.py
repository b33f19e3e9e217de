"""Retrieval-augmented generation (survey §9.6, open-book QA of §7.1.2).

Implements:
- `Retriever(corpus)`: BM25 over passages (icl.BM25), `search(query, k) -> [(index, score)]`;
- `recall_at_k(retriever, queries, relevant, k)`: fraction of queries with a relevant passage in the top k;
- `rag_prompt(question, passages)`: numbered passages "[1] ..." then the question, asking for citations;
- `citations(answer)`: the passage numbers an answer cites, e.g. "Paris [1][3]" -> [1, 3];
- `answer_with_retrieval(lm, retriever, question, k)`: retrieve, prompt, generate.
"""
from __future__ import annotations

import re
from typing import Sequence

from .icl import BM25


class Retriever:
    def __init__(self, corpus: Sequence[str]):
        self.corpus = list(corpus)
        self.bm25 = BM25(self.corpus)

    def search(self, query: str, k: int = 3) -> list[tuple[int, float]]:
        s = self.bm25.scores(query)
        order = sorted(range(len(s)), key=lambda i: (-s[i], i))[:k]
        return [(i, float(s[i])) for i in order]


def recall_at_k(retriever: Retriever, queries: Sequence[str], relevant: Sequence[set[int] | int], k: int) -> float:
    hits = 0
    for q, rel in zip(queries, relevant):
        rel = {rel} if isinstance(rel, int) else set(rel)
        hits += bool(rel & {i for i, _ in retriever.search(q, k)})
    return hits / max(len(queries), 1)


def rag_prompt(question: str, passages: Sequence[str]) -> str:
    ctx = "\n".join(f"[{i}] {p}" for i, p in enumerate(passages, 1))
    return (f"Answer the question using the passages below and cite them as [n].\n\n{ctx}\n\n"
            f"Question: {question}\nAnswer:")


def citations(answer: str) -> list[int]:
    return sorted({int(n) for n in re.findall(r"\[(\d+)\]", answer)})


def answer_with_retrieval(lm, retriever: Retriever, question: str, k: int = 3, max_new_tokens: int = 64) -> dict:
    hits = retriever.search(question, k)
    passages = [retriever.corpus[i] for i, _ in hits]
    prompt = rag_prompt(question, passages)
    text = lm.generate([prompt], max_new_tokens=max_new_tokens, stop=["\n\n", "\nQuestion:"])[0]
    cited = [hits[c - 1][0] for c in citations(text) if 0 < c <= len(hits)]
    return {"answer": text.strip(), "prompt": prompt, "retrieved": [i for i, _ in hits], "cited_passages": cited}
