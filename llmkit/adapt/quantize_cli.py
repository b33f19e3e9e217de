"""`llmkit quantize --config RECIPE.yaml [--out DIR] [key=value ...]`: post-training quantisation (survey §5.4).

Recipe: `base` (what llmkit.load reads), `method` {kind: rtn | gptq | nf4 | int8 | smoothquant, bits, group_size,
symmetric, alpha}, `data` {path: a text file for calibration and perplexity, calib_batches, seq_len, eval_batches}.
Writes `final/` = config.json + quantized.safetensors (int codes, scales, zeros) + quant_config.json + tokenizer,
`report.json` with the perplexity of the full-precision and the quantised model on the same held-out text, and a
manifest naming the base and the data. `load_quantized(dir)` rebuilds the model from `final/`.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from . import pipeline as pl


def text_batches(tok, text: str, seq_len: int, n: int, offset: int = 0) -> list[torch.Tensor]:
    ids = tok.encode(text)
    chunks = [ids[i: i + seq_len] for i in range(offset * seq_len, len(ids) - seq_len, seq_len)][:n]
    if not chunks:
        raise ValueError(f"the calibration text has fewer than {seq_len} tokens; use a longer file")
    return [torch.tensor([c]) for c in chunks]


@torch.no_grad()
def perplexity(model, batches: list[torch.Tensor]) -> float:
    from .logprobs import token_logps

    model.eval()
    nll, n = 0.0, 0
    for ids in batches:
        lp = token_logps(model(ids)[:, :-1], ids[:, 1:])
        nll -= lp.sum().item()
        n += lp.numel()
    return math.exp(nll / max(n, 1))


def apply_method(model, method: dict, calib: list[torch.Tensor]):
    from . import ptq, quantize as qz

    kind, bits, group = method.get("kind", "rtn"), method.get("bits", 8), method.get("group_size")
    sym = method.get("symmetric", kind != "gptq")
    if kind == "rtn":
        return qz.quantize_model(model, bits, group, sym)
    if kind == "gptq":
        return ptq.gptq_model(model, calib, bits, group, sym)
    if kind == "nf4":
        return qz.nf4_model(model, block=method.get("block", 64))
    if kind == "int8":
        return ptq.int8_model(model, method.get("threshold", 6.0))
    if kind == "smoothquant":  # smoothed then W8A8 (simulated int8 activations)
        ptq.smooth_model(model, ptq.act_absmax(model, calib), method.get("alpha", 0.5))
        return ptq.w8a8_model(model)
    raise ValueError(f"method.kind={kind!r}: choose rtn, gptq, nf4, int8 or smoothquant")


def load_quantized(directory: str | Path):
    """(model, tokenizer) from a `final/` directory written by `llmkit quantize` (rtn, gptq, nf4, int8)."""
    from safetensors.torch import load_file

    from ..model.config import ModelConfig
    from ..model.transformer import Transformer
    from ..tokenizer import Tokenizer

    d = Path(directory)
    qc_path = d / "quant_config.json"
    if not qc_path.exists():
        raise FileNotFoundError(f"{d} has no quant_config.json: it was not written by `llmkit quantize`")
    qc = json.loads(qc_path.read_text())
    if qc.get("kind") == "smoothquant":
        raise ValueError(f"{d}: smoothquant output is simulated W8A8; reload the base and re-apply it")
    model = Transformer(ModelConfig.load(d / "config.json"))
    if qc.get("kind", "rtn") in ("rtn", "gptq"):  # same QuantLinear layout: build it by RTN, then fill it
        from .quantize import quantize_model

        quantize_model(model, qc.get("bits", 8), qc.get("group_size"), qc.get("symmetric", qc.get("kind") != "gptq"))
    else:
        apply_method(model, qc, [])
    model.load_state_dict(load_file(str(d / "quantized.safetensors")), strict=True)
    tok = Tokenizer.load(d) if (d / "tokenizer.json").exists() else None
    return model.eval(), tok


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import save_file

    from ..artifacts import atomic_write_json, write_manifest
    from .cli import base_parent

    ap = argparse.ArgumentParser(prog="llmkit quantize", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    try:
        recipe = pl.load_recipe(args.config, args.overrides)
        data = recipe.get("data") or {}
        text = pl.resolve(data["path"], recipe).read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"llmkit quantize: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or f"runs/quantize-{time.strftime('%Y%m%d-%H%M%S')}")
    model, tok = pl.load_base(recipe)
    seq = data.get("seq_len", 256)
    calib = text_batches(tok, text, seq, data.get("calib_batches", 8))
    held = text_batches(tok, text, seq, data.get("eval_batches", 8), offset=data.get("calib_batches", 8))
    method = recipe.get("method") or {}
    t0 = time.time()
    ppl_fp = perplexity(model, held)
    model = apply_method(model, method, calib)
    ppl_q = perplexity(model, held)
    report = {"method": method, "ppl_fp": ppl_fp, "ppl_quantized": ppl_q, "seconds": time.time() - t0,
              "eval_tokens": sum(b.numel() for b in held)}
    final = out / "final"
    final.mkdir(parents=True, exist_ok=True)
    model.cfg.save(final / "config.json")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(final / "quantized.safetensors"))
    atomic_write_json(final / "quant_config.json", method)
    if tok is not None:
        tok.save(final)
    write_manifest(final, "quantized_checkpoint", parents=[base_parent(recipe["base"]), str(pl.resolve(data["path"], recipe))],
                   config={k: v for k, v in recipe.items() if k != "_path"}, command=["llmkit quantize", *(argv or [])])
    atomic_write_json(out / "report.json", report)
    print(f"llmkit quantize: {method.get('kind', 'rtn')} ppl {ppl_fp:.3f} -> {ppl_q:.3f} -> {final}")
    return 0
