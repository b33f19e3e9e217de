"""`llmkit sft|rm|dpo|ppo|grpo|quantize --config RECIPE.yaml [--out DIR] [--resume] [key=value ...]` (survey §5).

Every training verb builds an objective and a data source for the one Trainer (`llmkit.train.trainer`), so it
has pre-training's progress bar, metrics.jsonl, TensorBoard, report.html, checkpoints and `--resume`.
Outputs in --out: `final/` (a llmkit checkpoint that `llmkit.load` reads; LoRA merged), `adapter/` (PEFT
format, LoRA runs), `reward_head.safetensors` (rm), each with a manifest.json naming the base model and data.
Recipes ship in llmkit/recipes (sft-*, rm-*, dpo-*, ppo-*, grpo-*, quantize-*); see `pipeline.py` for the schema.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

from . import pipeline as pl


def _prompts(recipe: dict, tok) -> tuple[list[dict], list[str]]:
    """RL prompts {prompt_ids, answer} from generated arithmetic or GSM8K, rendered with the chat template."""
    data = recipe.get("data") or {}
    kind, files = data.get("kind", "arithmetic"), []
    if kind == "arithmetic":
        rows = [{"question": p["question"], "answer": p["answer"]} for p in pl.idata_arith(data)]
    elif kind == "gsm8k":
        path = pl.resolve(data["path"], recipe)
        files.append(str(path))
        from .rewards import extract_answer

        rows = [{"question": r["question"], "answer": extract_answer(r["answer"])}
                for r in pl.idata.read_jsonl(path)[: data.get("limit")]]
    else:
        raise ValueError(f"data.kind={kind!r} for RL prompts: choose arithmetic or gsm8k")
    return [{"prompt_ids": render_prompt(tok, r["question"]), "answer": r["answer"]} for r in rows], files


def stop_ids(tok) -> list[int]:
    """EOS and, for ChatML templates, <|im_end|>: where a sampled assistant turn ends."""
    ids = [tok.eos_token_id, getattr(tok, "token_to_id", lambda t: None)("<|im_end|>")]
    return list(dict.fromkeys(i for i in ids if i is not None))


def render_prompt(tok, question: str) -> list[int]:
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
    else:
        text = question + "\n"
    return tok.encode(text)


def _score_fn(recipe: dict, tok):
    from .rewards import numeric_reward, token_reward_fn

    method = recipe.get("method") or {}
    reward = method.get("reward", "numeric")
    if reward == "numeric":
        bonus = method.get("format_bonus", 0.0)
        return token_reward_fn(tok, lambda text, item: numeric_reward(text, item["answer"], bonus), stop="\n\n")
    rm = load_reward_model(reward)  # a directory written by `llmkit rm`

    @torch.no_grad()
    def score(items, completions):
        from .dpo import collate_preferences

        ex = [{"prompt_ids": it["prompt_ids"], "chosen_ids": c, "rejected_ids": c} for it, c in zip(items, completions)]
        b = collate_preferences(ex, tok.pad_token_id or 0)
        return rm(b["input_ids"][: len(ex)], b["attention_mask"][: len(ex)])
    return score


def load_reward_model(directory: str | Path):
    from safetensors.torch import load_file

    from .. import load
    from .reward import RewardModel

    d = Path(directory)
    head = d / "reward_head.safetensors"
    if not head.exists():
        raise FileNotFoundError(f"{d} is not a reward model: it has no reward_head.safetensors (train one with `llmkit rm`)")
    backbone, _ = load(d)
    rm = RewardModel(backbone)
    rm.score.weight.data.copy_(load_file(str(head))["score.weight"])
    return rm.eval()


def build(stage: str, recipe: dict, model, tok, cfg) -> dict:
    """{model, data, val, loss_fn, files, policy} for a stage."""
    method = recipe.get("method") or {}
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    lora = (recipe.get("peft") or {}).get("kind", "none") != "none"
    if stage == "sft":
        pl.apply_peft(model, recipe.get("peft"))
        train, val, files = pl.sft_data(recipe, tok, cfg)
        from .logprobs import sft_loss

        return {"model": model, "policy": model, "data": train, "val": val, "loss_fn": sft_loss, "files": files}
    if stage in ("rm", "dpo"):
        pairs, files = pl.preference_pairs(recipe.get("data") or {}, recipe, tok)
        tr, va = pl.split(pairs, (recipe.get("data") or {}).get("val_fraction", 0.1), cfg.seed)
        shared = stage == "dpo"  # the reward model scores whole rows; DPO shares each prompt's forward
        data = pl.PairLoader(tr, cfg.micro_batch_size, pad, cfg.seed, shared)
        val = pl.PairLoader(va, cfg.micro_batch_size, pad, cfg.seed, shared) if len(va) >= cfg.micro_batch_size else None
        if stage == "rm":
            from .reward import RewardModel, RewardObjective

            pl.apply_peft(model, recipe.get("peft"))
            rm = RewardModel(model)
            rm.score.weight.requires_grad_(True)
            obj = RewardObjective(method.get("center_coef"), method.get("lm_coef", 0.0))
            return {"model": rm, "policy": model, "data": data, "val": val, "loss_fn": obj, "files": files, "val_pairs": va}
        from .dpo import DPOObjective

        ref = None if lora else copy.deepcopy(model)
        pl.apply_peft(model, recipe.get("peft"))
        obj = DPOObjective(ref, method.get("beta", 0.1), method.get("loss_type", "sigmoid"), method.get("label_smoothing", 0.0))
        return {"model": model, "policy": model, "data": data, "val": val, "loss_fn": obj, "files": files}
    if stage in ("ppo", "grpo"):
        items, files = _prompts(recipe, tok)
        ref = None if lora else copy.deepcopy(model).eval().requires_grad_(False)
        pl.apply_peft(model, recipe.get("peft"))
        score = _score_fn(recipe, tok)
        common = dict(eos_id=stop_ids(tok), pad_id=pad, max_new_tokens=method.get("max_new_tokens", 32),
                      temperature=method.get("temperature", 1.0), seed=cfg.seed)
        if stage == "grpo":
            from .grpo import GRPOObjective, GRPORollouts

            data = GRPORollouts(model, items, score, ref, prompts_per_step=method.get("prompts_per_step", 4),
                                group=method.get("group", 8), beta=method.get("beta", 0.04), **common)
            obj = GRPOObjective(method.get("beta", 0.04), method.get("clip", 0.2), method.get("clip", 0.2),
                                method.get("loss_type", "grpo"))
            return {"model": model, "policy": model, "data": data, "val": None, "loss_fn": obj, "files": files}
        from .ppo import ActorCritic, PPOObjective, PPORollouts

        ac = ActorCritic(model)
        data = PPORollouts(ac, items, score, ref, rollout_batch=method.get("rollout_batch", 16),
                           mini_batch=cfg.micro_batch_size, ppo_epochs=method.get("ppo_epochs", 2),
                           kl_coef=method.get("kl_coef", 0.05), kl_target=method.get("kl_target"),
                           gamma=method.get("gamma", 1.0), lam=method.get("lam", 0.95), **common)
        obj = PPOObjective(method.get("clip", 0.2), method.get("vf_coef", 0.1), method.get("clip_value", 0.2))
        return {"model": ac, "policy": model, "data": data, "val": None, "loss_fn": obj, "files": files}
    raise ValueError(f"unknown stage {stage!r}")


def base_parent(base: str) -> dict | str:
    p = Path(base)
    if p.exists():
        return str(p)
    from ..artifacts import file_sha256
    from ..interop.loading import resolve_alias

    path = resolve_alias(base)
    return {"alias": base, "path": str(path), "sha256": file_sha256(path)}


def finish(stage: str, recipe: dict, built: dict, out: Path, tok, command: list[str]) -> Path:
    """final/ (merged checkpoint) + adapter/ (PEFT) + reward head, each with a manifest naming base and data."""
    from safetensors.torch import save_file

    from ..artifacts import write_manifest
    from ..interop.checkpoint import save_checkpoint
    from .peft import lora_modules, merge_lora, save_adapter

    parents = [base_parent(recipe["base"]), *built["files"]]
    config = {k: v for k, v in recipe.items() if k != "_path"}
    policy = built["policy"]
    final = out / "final"
    final.mkdir(parents=True, exist_ok=True)
    if lora_modules(policy):
        save_adapter(policy, out / "adapter", base_model=str(recipe["base"]))
        write_manifest(out / "adapter", "adapter", parents=parents, config=config, command=command)
    if stage == "rm":
        save_file({"score.weight": built["model"].score.weight.detach().cpu().contiguous()}, str(final / "reward_head.safetensors"))
    merged = merge_lora(copy.deepcopy(policy)) if lora_modules(policy) else policy
    if any(type(m).__name__ in ("NF4Linear", "QuantLinear") for m in merged.modules()):
        raise RuntimeError("cannot export a quantised base as a plain checkpoint; merge_lora should have dequantised it")
    save_checkpoint(final, merged.float(), tok, parents=parents, config=config, command=command)
    return final


@torch.no_grad()
def pair_accuracy(rm, pairs: list[dict], pad: int, batch: int = 16) -> float:
    from .dpo import collate_preferences

    rm.eval()
    hits = []
    for i in range(0, len(pairs), batch):
        b = collate_preferences(pairs[i: i + batch], pad)
        r = rm(b["input_ids"], b["attention_mask"])
        rc, rr = r.chunk(2)
        hits += (rc > rr).tolist()
    return sum(hits) / max(1, len(hits))


def run_stage(stage: str, argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(prog=f"llmkit {stage}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="recipe YAML file or shipped recipe name")
    ap.add_argument("--out", default=None, help=f"run directory (default runs/{stage}-<time>)")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of --out")
    ap.add_argument("overrides", nargs="*", help="key=value overrides: method.beta=0.2 peft.r=16 lr=1e-4")
    args = ap.parse_args(argv)
    try:
        recipe = pl.load_recipe(args.config, args.overrides)
    except (FileNotFoundError, ValueError) as e:
        print(f"llmkit {stage}: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or f"runs/{stage}-{time.strftime('%Y%m%d-%H%M%S')}")
    has_ckpt = (out / "checkpoints").exists() and any((out / "checkpoints").iterdir())
    if args.resume and not has_ckpt:
        print(f"llmkit {stage}: --resume but {out}/checkpoints holds nothing; run without --resume first", file=sys.stderr)
        return 2
    if not args.resume and has_ckpt:
        print(f"llmkit {stage}: {out} already holds checkpoints; pass --resume or a new --out", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    final, built, trainer, tok = train(stage, recipe, out, resume=args.resume)
    summary = {k: final.get(k) for k in ("step", "loss", "val_loss") if k in final}
    if stage == "rm" and built.get("val_pairs"):
        summary["val_pair_acc"] = pair_accuracy(built["model"], built["val_pairs"], tok.pad_token_id or 0)
    dest = finish(stage, recipe, built, out, tok, [f"llmkit {stage}", *(argv or sys.argv[2:])])
    from ..artifacts import atomic_write_json

    atomic_write_json(out / "summary.json", summary)
    print(f"llmkit {stage}: " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items())
          + f" -> {dest}")
    return 0


def time_budget_hook(seconds: float):
    """A Trainer hook that ends the run at the first logged step after `seconds` (the demo's wall-clock budget)."""
    t0 = time.perf_counter()

    def hook(trainer, record):
        if time.perf_counter() - t0 > seconds:
            trainer.cfg.max_steps = trainer.step
    return hook


def train(stage: str, recipe: dict, out: Path | None, resume: bool = False, model=None, tok=None, hooks=None):
    """Build and fit; returns (final record, built parts, trainer, tokenizer). `model`/`tok` skip loading the base."""
    from ..train.config import TrainConfig
    from ..train.trainer import Trainer

    cfg = TrainConfig.from_dict(recipe.get("train") or {})
    torch.manual_seed(cfg.seed)
    if model is None:
        model, tok = pl.load_base(recipe)
    built = build(stage, recipe, model, tok, cfg)
    trainer = Trainer(built["model"], cfg, built["data"], loss_fn=built["loss_fn"], out_dir=out, val_data=built["val"],
                      tokenizer=tok, model_config=model.cfg, recipe={k: v for k, v in recipe.items() if k != "_path"},
                      hooks=hooks)
    final = trainer.fit(resume=resume)
    if out is not None and trainer.is_main:
        from ..train.report import write_report

        write_report(out)
    return final, built, trainer, tok


def sft_main(argv: list[str] | None = None) -> int:
    return run_stage("sft", argv)


def rm_main(argv: list[str] | None = None) -> int:
    return run_stage("rm", argv)


def dpo_main(argv: list[str] | None = None) -> int:
    return run_stage("dpo", argv)


def ppo_main(argv: list[str] | None = None) -> int:
    return run_stage("ppo", argv)


def grpo_main(argv: list[str] | None = None) -> int:
    return run_stage("grpo", argv)


def quantize_main(argv: list[str] | None = None) -> int:
    from .quantize_cli import main

    return main(argv)
