"""Data-cleaning demo for `make demo` (survey §4.1): a corpus every machine has, cleaned by the default pipeline.

The corpus is the Python standard library's own documentation: the docstrings of each stdlib module
(module, classes, functions), read with `ast` from the files `sysconfig` points at -- nothing is
imported or downloaded. Planted into it, so that every stage has something to do: exact copies,
near-copies (one word changed), documents with e-mail addresses / phone numbers / IPs, a German and a
French document, a lorem-ipsum page, a boilerplate-heavy list, and malformed records (bad JSON, an
empty line, invalid UTF-8). `run(out_dir)` writes the input, cleans it and prints the funnel.
"""
from __future__ import annotations

import ast
import json
import random
import sysconfig
import time
from pathlib import Path

from .cli import funnel_text
from .pipeline import load_config
from .runner import clean

MAX_FILES = 400


def stdlib_docs(max_files: int | None = None) -> list[dict]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if not p.name.startswith("_"))
    files += sorted(p for p in root.glob("*/*.py") if "test" not in p.parts[-2] and "idlelib" not in p.parts)
    docs = []
    for p in files[: max_files or MAX_FILES]:
        try:
            tree = ast.parse(p.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        parts = [ast.get_docstring(tree) or ""]
        parts += [ast.get_docstring(n) or "" for n in ast.walk(tree)
                  if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        text = "\n\n".join(t.strip() for t in parts if t and len(t.split()) > 3)
        if text:
            docs.append({"id": str(p.relative_to(root)), "text": text, "url": f"stdlib://{p.relative_to(root)}"})
    return docs


PLANTED = [
    ("pii-1", "Questions about the release can go to maintainer.jane@example.org or to the support desk at "
              "+1 415-555-2671. The build server answers at 93.184.216.34 while internal hosts like 10.0.0.7 stay private. "),
    ("german", "Die Standardbibliothek von Python enthält viele Module, die bei der täglichen Arbeit helfen. "
               "Sie werden mit dem Interpreter ausgeliefert und müssen nicht separat installiert werden. " * 4),
    ("french", "La bibliothèque standard de Python contient de nombreux modules utiles pour le travail quotidien. "
               "Ils sont livrés avec l'interpréteur et n'ont pas besoin d'être installés séparément. " * 4),
    ("lorem", "Lorem ipsum dolor sit amet, consectetur adipiscing elit. Sed do eiusmod tempor incididunt ut labore. " * 6),
    ("boilerplate", "\n".join(["Home", "About", "Contact", "Login", "Share on Facebook", "Tweet this"] * 8)),
]


def _passes_filters(text: str) -> bool:
    """Plant copies of documents the quality filters keep, so that dedup is what removes the copies."""
    from .document import Document
    from .filters import C4Quality, GopherQuality, GopherRepetition

    doc = Document("x", text)
    ok = all(st.apply(doc) is None for st in (GopherRepetition(), GopherQuality(), C4Quality()))
    return ok and len(doc.text) > 1500  # enough text left after C4's line edits for clear near-copies


def build_corpus(path: Path, seed: int = 0) -> dict:
    rng = random.Random(seed)
    docs = stdlib_docs()
    long_docs = [d for d in docs if len(d["text"].split()) > 200 and _passes_filters(d["text"])]
    # the PII carrier: a document that still passes the filters with the PII paragraph appended; it is
    # withheld from the corpus, or dedup would remove the PII version as a near-copy of it
    pii_text = PLANTED[0][1]
    base = next(d["text"] for d in reversed(long_docs) if _passes_filters(d["text"] + "\n\n" + pii_text))
    long_docs = [d for d in long_docs if d["text"] != base]
    lines = [json.dumps(d) for d in docs if d["text"] != base]
    for i, d in enumerate(long_docs[:8]):  # exact copies
        lines.append(json.dumps({**d, "id": f"copy-{i}"}))
    for i, d in enumerate(long_docs[8:16]):  # near-copies: one word changed
        words = d["text"].split(" ")
        alpha = [i for i, w in enumerate(words) if w.isalpha()]  # a plain word, so line structure is kept
        words[rng.choice(alpha[len(alpha) // 2:])] = "changed"
        lines.append(json.dumps({**d, "id": f"near-{i}", "text": " ".join(words)}))
    for pid, text in PLANTED:
        lines.append(json.dumps({"id": pid, "text": (base + "\n\n" + text) if pid.startswith("pii") else text}))
    lines[10:10] = ["{this is not json", ""]
    data = ("\n".join(lines) + "\n").encode() + b'{"id": "bad-utf8", "text": "caf\xe9"}\n'
    path.write_bytes(data)
    return {"stdlib_docs": len(docs), "exact_copies": min(8, len(long_docs)), "near_copies": len(long_docs[8:16])}


def run(out_dir: str | Path, workers: int = 2) -> dict:
    """Build the corpus in out_dir/input.jsonl, clean it into out_dir/clean, print and return the funnel."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    planted = build_corpus(out_dir / "input.jsonl")
    cfg = {**load_config(None), "docs_per_shard": 200}
    stats = clean([str(out_dir / "input.jsonl")], out_dir / "clean", cfg, workers=workers,
                  command=["llmkit.data.demo.run", str(out_dir)])
    print(f"data demo: cleaned {planted['stdlib_docs']} stdlib docstring documents + planted copies/PII/noise "
          f"in {time.time() - t0:.1f}s")
    print(funnel_text(stats))
    print(f"report: {out_dir / 'clean' / 'report.html'}")
    return {"stats": stats, "planted": planted, "output": str(out_dir / "clean")}


if __name__ == "__main__":
    import sys
    import tempfile

    run(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="llmkit-data-demo-"))
