"""`llmkit convert`: move a model between formats (llmkit checkpoint, HF directory, GGUF).

    llmkit convert SRC --to hf|gguf|llmkit --out PATH [--dtype float32|bfloat16|float16]

SRC is anything `llmkit.load` takes: a llmkit checkpoint dir, an HF model dir, a .gguf file or an alias
(`smollm2-135m-instruct`). GGUF output is the llama architecture in float32 or float16 (gguf_io.write_gguf).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import LoadError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="llmkit convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="llmkit checkpoint dir, HF model dir, .gguf file or alias")
    ap.add_argument("--to", required=True, choices=["hf", "gguf", "llmkit"], help="output format")
    ap.add_argument("--out", required=True, type=Path, help="output directory (hf, llmkit) or .gguf file")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="weight dtype of the output (GGUF: float32 or float16)")
    args = ap.parse_args(argv)
    from .loading import load

    try:
        model, tok = load(args.src)
    except LoadError as e:
        print(f"llmkit convert: {e}", file=sys.stderr)
        return 2
    if args.to == "gguf":
        from .gguf_io import write_gguf

        if args.dtype == "bfloat16":
            print("llmkit convert: GGUF output is float32 or float16; use --dtype float16", file=sys.stderr)
            return 2
        out = args.out if args.out.suffix == ".gguf" else args.out / "model.gguf"
        try:
            write_gguf(out, model, tok, dtype=args.dtype)
        except ValueError as e:
            print(f"llmkit convert: {e}", file=sys.stderr)
            return 2
    else:
        from .checkpoint import to_dtype

        model = model.to(to_dtype(args.dtype))
        if args.to == "hf":
            from .hf import save_hf

            out = save_hf(args.out, model, tok)
        else:
            from .checkpoint import save_checkpoint

            src = Path(args.src)
            parents = [src] if src.exists() else [{"alias": args.src}]
            out = save_checkpoint(args.out, model, tok, parents=parents, config=vars(args) | {"out": str(args.out)},
                                  command=["llmkit", "convert", *(argv if argv is not None else sys.argv[1:])])
    print(json.dumps({"src": str(args.src), "to": args.to, "out": str(out), "dtype": args.dtype,
                      "params": sum(p.numel() for p in model.parameters()), "family": model.cfg.family}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
