"""`llmkit eval MODEL [MODEL ...] --tasks hellaswag,arc_easy,gsm8k,...` (survey §7).

MODEL is anything `llmkit.load` takes (checkpoint dir, HF dir, .gguf, alias such as smollm2-135m-instruct),
`hf:PATH` for a transformers model directory, or `openai:BASE_URL@MODEL_NAME` for an OpenAI-compatible server.
Writes, per model, DIR/<model>/results.json, samples.jsonl, report.md, report.html; with several models also
DIR/table.md and DIR/scaling.png (accuracy vs parameters). Deterministic: same inputs and flags, same numbers.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path


DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def build_lm(spec: str, batch_tokens: int | None = None, max_length: int | None = None, dtype: str = "float32"):
    """An LM for a model spec; `dtype` is the weights' and activations' precision (bfloat16 runs the matrix
    products on the CPU's bf16 units, ~4x float32 where oneDNN finds AMX, at ~0.1 nat of log-prob error)."""
    import torch

    from .lm import HFLM, LlmkitLM

    torch_dtype = getattr(torch, DTYPES[dtype])

    if spec.startswith("openai:"):
        from .lm_openai import OpenAILM

        url, _, model = spec[len("openai:"):].rpartition("@")
        if not url:
            raise SystemExit(f"llmkit eval: {spec!r}: write openai:BASE_URL@MODEL_NAME, e.g. openai:http://localhost:8000/v1@llmkit")
        return OpenAILM(url, model)
    if spec.startswith("hf:"):
        import transformers

        path = spec[3:]
        tok = transformers.AutoTokenizer.from_pretrained(path)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        return HFLM(model, tok, max_length=max_length, name=Path(path).name)
    import llmkit

    model, tok = llmkit.load(spec, dtype=torch_dtype)
    return LlmkitLM(model, tok, max_length=max_length, batch_tokens=batch_tokens, name=_short(spec))


def _short(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(spec).name or spec)[:64]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmkit eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="model spec(s); see above")
    p.add_argument("--tasks", required=True, help="comma-separated task names (`--list-tasks` shows them)")
    p.add_argument("--num-fewshot", type=int, default=None, help="k demonstrations (default: each task's own)")
    p.add_argument("--limit", type=int, default=None, help="first N items of each task")
    p.add_argument("--cot", action="store_true", help="chain-of-thought demos for generation tasks")
    p.add_argument("--self-consistency", type=int, default=0, metavar="N", help="N sampled paths + majority vote")
    p.add_argument("--fewshot-select", default="default", choices=["default", "random", "first", "bm25", "knn", "mmr"])
    p.add_argument("--fewshot-order", default="as_is", choices=["as_is", "reverse", "random", "similarity"])
    p.add_argument("--code-samples", type=int, default=1, help="samples per HumanEval problem (pass@k, k<=n)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--batch-tokens", type=int, default=None, help="scoring batch size in tokens (llmkit models)")
    p.add_argument("--max-length", type=int, default=None, help="context window (default: the model's)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="precision of weights and activations (float32: exact log-probs; bfloat16: faster, approximate)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; on a busy shared machine 1 per process is faster)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--data-dir", default=None, help="folder of the task files (default: $LLMKIT_DATA or ../shared/data)")
    p.add_argument("--output", default="eval_out", help="output directory")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--list-tasks", action="store_true", help="print the task names and exit")
    return p


def main(argv: list[str]) -> int:
    if "--list-tasks" in argv:
        from .tasks import task_names

        print("\n".join(task_names()))
        return 0
    args = parser().parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from .harness import EvalConfig, evaluate
    from .report import markdown, plot_scaling, table, write_run
    from .tasks import TaskDataError, get_tasks

    try:
        tasks = get_tasks(args.tasks, Path(args.data_dir) if args.data_dir else None)
    except TaskDataError as e:
        print(f"llmkit eval: {e}", file=sys.stderr)
        return 2
    cfg = EvalConfig(num_fewshot=args.num_fewshot, limit=args.limit, cot=args.cot,
                     self_consistency=args.self_consistency, fewshot_select=args.fewshot_select,
                     fewshot_order=args.fewshot_order, seed=args.seed, max_new_tokens=args.max_new_tokens,
                     code_samples=args.code_samples, progress=not args.no_progress)
    out = Path(args.output)
    by_model = {}
    for spec in args.models:
        lm = build_lm(spec, args.batch_tokens, args.max_length, args.dtype)
        try:
            results, samples = evaluate(lm, tasks, cfg)
        except TaskDataError as e:
            print(f"llmkit eval: {e}", file=sys.stderr)
            return 2
        name = _short(spec)
        write_run(out / name if len(args.models) > 1 else out, results, samples, command=["llmkit", "eval", *argv])
        by_model[name] = results
        print(markdown(results))
    if len(by_model) > 1:
        (out / "table.md").write_text(table(by_model))
        print(table(by_model))
        png = plot_scaling(by_model, out / "scaling.png")
        if png:
            print(f"scaling plot: {png}")
    print(f"wrote {out}")
    return 0
