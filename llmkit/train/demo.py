"""Demo hook for `make demo` (survey §4.3): pre-train a small model on an embedded corpus in about 1-2 minutes.

The corpus is the Python standard library's own source code and docstrings: real text that every Python
install brings (never ../shared). `run(out_dir)` trains a byte-level BPE tokenizer on it
(`llmkit.tokenizer.train.train_tokenizer`), pre-trains the `demo` recipe, prints samples along the way,
and writes metrics.jsonl, a checkpoint, loss_curve.png and report.html into the run directory.
"""
from __future__ import annotations

import sys
import sysconfig
import time
from pathlib import Path

from .config import load_recipe


def stdlib_corpus(max_bytes: int = 1_500_000) -> list[str]:
    """Source files of the standard library (no tests, no site-packages), in a fixed order, up to max_bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if not p.name.startswith(("test", "_")))
    files += sorted(p for p in root.glob("*/*.py") if p.parts[-2] in ("json", "email", "http", "asyncio", "logging"))
    texts, total = [], 0
    for p in files:
        try:
            t = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(t)
        total += len(t.encode())
        if total >= max_bytes:
            break
    if not texts:
        raise FileNotFoundError(f"no standard-library sources under {root}; pass corpus_texts=")
    return texts


def run(out_dir: str | Path, corpus_texts: list[str] | None = None, overrides: list[str] | None = None) -> Path:
    from ..tokenizer.train import train_tokenizer
    from .cli import build_run
    from .report import write_report

    recipe = load_recipe("demo", overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = corpus_texts or stdlib_corpus(int(recipe.data.get("corpus_bytes", 1_500_000)))
    t0 = time.perf_counter()
    tok = train_tokenizer(texts, None, int(recipe.data.get("tokenizer_vocab", 1024)), chat_template=None)
    print(f"demo: corpus {sum(map(len, texts)) / 1e6:.1f} MB of Python stdlib source, "
          f"BPE tokenizer {tok.vocab_size} tokens ({time.perf_counter() - t0:.1f}s)", flush=True)
    trainer, _ = build_run(recipe, out, texts=texts, tokenizer=tok)
    n = trainer.model_config.num_params()
    print(f"demo: pre-training a {n / 1e6:.2f}M-parameter model for {trainer.cfg.max_steps} steps", flush=True)
    final = trainer.fit(resume=False)
    from .data import sample_text

    sample = sample_text(trainer.raw_model, tok, trainer.cfg.sample_prompt, 160, seed=0, device=trainer.device)
    print(f"demo: final loss {final['loss']:.3f}, val loss {final.get('val_loss', float('nan')):.3f}\n"
          f"demo: sample:\n{sample}\n", flush=True)
    report = write_report(out)
    print(f"demo: loss curve {out / 'loss_curve.png'}, report {report}", flush=True)
    return out


if __name__ == "__main__":
    run(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")
