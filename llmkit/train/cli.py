"""`llmkit pretrain`: pre-train a model from a YAML recipe (survey §4.3).

    llmkit pretrain --config RECIPE.yaml [--out RUN_DIR] [key=value ...] [--resume]

RECIPE is a file or the name of a shipped recipe (llmkit/recipes/NAME.yaml: demo, shakespeare-char,
gpt2-124m, llama-1b). Overrides address the recipe's sections: `train.lr=1e-3`, `model.n_layers=6`,
`data.path=input.txt` (a bare key means `train.`). `--resume` continues from the latest good
checkpoint of RUN_DIR; the run writes metrics.jsonl, tb/, checkpoints/ and report.html there.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ..artifacts import atomic_write_json
from .config import load_recipe


def build_run(recipe, out_dir: Path, *, texts=None, tokenizer=None, dist=None):
    """(trainer, tokenizer) for a recipe: model from `model:`, loaders from `data:`, Trainer from `train:`."""
    from ..model.transformer import Transformer
    from .data import build_data
    from .denoising import SPECIAL_ID_OBJECTIVES, special_vocab, wrap_objective
    from .objectives import make_loss_fn
    from .trainer import Trainer

    cfg = recipe.train_config()
    torch.manual_seed(cfg.seed)
    # data-parallel coordinates: tensor-parallel peers read the same batch
    rank = getattr(dist, "dp_rank", getattr(dist, "rank", 0))
    world = getattr(dist, "dp_world", getattr(dist, "world_size", 1))
    base = Path(recipe.path).parent if recipe.path else None
    train, val, tokenizer = build_data(recipe.data, cfg, texts=texts, tokenizer=tokenizer, rank=rank,
                                       world_size=world, base_dir=base)
    mfields = dict(recipe.model)
    objective = recipe.data.get("objective", "causal_lm")
    if tokenizer is not None and mfields.get("vocab_size") in (None, "auto"):
        mfields["vocab_size"] = tokenizer.vocab_size
        if objective in SPECIAL_ID_OBJECTIVES:  # [R]/[S]/[X] and sentinels above the tokenizer's ids
            recipe.data["base_vocab"] = tokenizer.vocab_size
            mfields["vocab_size"] = special_vocab(tokenizer.vocab_size, int(recipe.data.get("n_sentinels", 100)))
    if tokenizer is not None:
        mfields.setdefault("eos_token_id", tokenizer.eos_token_id)
    recipe.model = mfields
    mcfg = recipe.model_config()
    train, val = wrap_objective(objective, train, val, mcfg, recipe.data, cfg.seed)
    model = Transformer(mcfg)
    pipelined = hasattr(dist, "pipeline_step")
    try:  # the layouts refuse what they cannot run (pipeline stages, tensor parallelism): said plainly, no traceback
        trainer = Trainer(model, cfg, train, loss_fn=None if pipelined else make_loss_fn(objective, cfg.z_loss),
                          out_dir=out_dir, val_data=val, dist=dist, tokenizer=tokenizer, model_config=mcfg,
                          recipe=recipe.to_dict())
    except ValueError as e:
        raise SystemExit(f"llmkit pretrain: {e}") from None
    return trainer, tokenizer


def maybe_dist(recipe):
    """Under torchrun (WORLD_SIZE > 1): `llmkit.train.distributed.setup_from_env(recipe)` builds the `Dist`."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    try:
        from .distributed import setup_from_env
    except ImportError as e:
        raise SystemExit(f"llmkit pretrain: launched with WORLD_SIZE>1 but distributed training is unavailable ({e})")
    return setup_from_env(recipe)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="llmkit pretrain", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="recipe YAML file or shipped recipe name")
    ap.add_argument("--out", default=None, help="run directory (default runs/<recipe>-<time>)")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of --out")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-3 model.n_layers=6")
    args = ap.parse_args(argv)
    try:
        recipe = load_recipe(args.config, args.overrides)
    except (FileNotFoundError, ValueError) as e:
        print(f"llmkit pretrain: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or f"runs/{Path(recipe.path).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.resume and not (out / "checkpoints").exists():
        print(f"llmkit pretrain: --resume but {out}/checkpoints does not exist; run without --resume first",
              file=sys.stderr)
        return 2
    if not args.resume and (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()):
        print(f"llmkit pretrain: {out} already holds checkpoints; pass --resume to continue it or a new --out",
              file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    if recipe.data.get("kind") == "texts" and not args.resume:  # the demo recipe: stdlib corpus + BPE (llmkit.train.demo)
        from .demo import run

        run(out, overrides=args.overrides)
        return 0
    dist = maybe_dist(recipe)
    trainer, tokenizer = build_run(recipe, out, dist=dist)
    atomic_write_json(out / "recipe.json", recipe.to_dict())
    final = trainer.fit(resume=args.resume)
    if trainer.is_main:
        from .report import write_report

        write_report(out)
        print(f"llmkit pretrain: step {final.get('step')} loss {final.get('loss', float('nan')):.4f}"
              + (f" val_loss {final['val_loss']:.4f}" if "val_loss" in final else "") + f" -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
