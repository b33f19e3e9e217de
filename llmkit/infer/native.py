"""Native decode kernels (survey §4.2.4 "efficiency"): the C++ step in csrc/decode.cpp, built at first use.

Batch-1 decoding is limited by streaming the weights once per token and by Python's per-op overhead. The
native step runs a whole token through the model in one call with float32 activations, reading weights
stored as float32, bfloat16, int8 (per output channel) or int4 in GGUF's Q4_1 block layout at memory speed.
This module:
- builds the extension with `torch.utils.cpp_extension.load` (-O3 -march=native; cached per CPU model and
  source hash under TORCH_EXTENSIONS_DIR) and returns None, with one warning, where no compiler is found;
  `LLMKIT_NATIVE=0` turns it off;
- packs weights into the native formats (`pack_int8`, `pack_q4_1`; `unpack_q4_1` dequantises for checks);
- `logit_stats(logits)`: logsumexp and argmax of vocabulary logits in one sweep (evaluation scoring);
- the same module carries the float32 CPU model kernels that llmkit.model calls through `native_ext()`:
  causal attention (csrc/attention.cpp) and RMSNorm / SwiGLU / RoPE / cross-entropy rows (csrc/train_ops.cpp);
- `NativeStep.build(fast)` turns a FastDecoder's fused weights into a native `Decoder`; float weights are
  shared with the model, not copied.
"""
from __future__ import annotations

import hashlib
import os
import platform
import sys
import warnings
from functools import lru_cache
from pathlib import Path

import torch

from ..model.layers import activation_base

SOURCES = [Path(__file__).with_name("csrc") / n for n in ("decode.cpp", "logits.cpp", "attention.cpp", "train_ops.cpp")]
HEADERS = [Path(__file__).with_name("csrc") / n for n in ("bf16.h", "vexp.h")]  # part of the cache key, not compiled on their own
KINDS = {"float32": 0, "bfloat16": 1, "int8": 2, "int4": 3}
ACTS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}
BLOCK = 32  # weights per Q4_1 block


def _cpu_tag() -> str:
    """The compiled module uses -march=native: key its cache by CPU model and flags, never share across CPUs."""
    info = platform.processor()
    try:
        text = Path("/proc/cpuinfo").read_text()
        info = next((ln for ln in text.splitlines() if ln.startswith("flags")), info) + \
            next((ln for ln in text.splitlines() if ln.startswith("model name")), "")
    except OSError:
        pass
    return hashlib.sha256((info + platform.machine()).encode()).hexdigest()[:10]


@lru_cache(maxsize=1)
def load_extension():
    """The compiled module, or None (warned once) when it cannot be built here."""
    if os.environ.get("LLMKIT_NATIVE", "1") == "0":
        return None
    src_hash = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES + HEADERS)).hexdigest()[:10]
    name = f"llmkit_decode_{src_hash}_{_cpu_tag()}"
    try:
        from torch.utils.cpp_extension import load

        # the `ninja` wheel installs its binary beside this interpreter, which need not be on PATH
        bindir = os.path.dirname(sys.executable)
        if bindir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
        from torch.utils.cpp_extension import _get_build_directory

        if not (Path(_get_build_directory(name, False)) / f"{name}.so").exists():
            print("llmkit: compiling the native kernels for this CPU (first use only, ~30-90 s)",
                  file=sys.stderr, flush=True)
        flags = ["-O3", "-march=native", "-fopenmp", "-std=c++17"]
        return load(name=name, sources=[str(p) for p in SOURCES], extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no ninja, unsupported platform: the PyTorch path still works
        warnings.warn(f"llmkit native kernels unavailable ({type(e).__name__}: {str(e)[:300]}); decoding, "
                      "scoring and float32 CPU training use the PyTorch ops. Install a C++ compiler and `ninja`, "
                      "or set LLMKIT_NATIVE=0.",
                      RuntimeWarning, stacklevel=2)
        return None


# ---------------------------------------------------------------------------------------------- weight formats
@torch.no_grad()
def pack_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: w ≈ q * s, q in [-127, 127], s = max|w_row| / 127."""
    w = w.float()
    s = (w.abs().amax(1) / 127).clamp(min=1e-12)
    return torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8).contiguous(), s.contiguous()


@torch.no_grad()
def pack_q4_1(w: torch.Tensor) -> torch.Tensor:
    """GGUF Q4_1 blocks [N, K/32, 20] uint8: fp16 d = (max-min)/15, fp16 m = min, 16 bytes of nibbles
    (low nibble = element j, high = element j+16); w ≈ q * d + m. d and m are rounded to fp16 before the codes
    are chosen, so the codes are the nearest for the scales actually stored (and a Q4_1 GGUF round-trips)."""
    N, K = w.shape
    if K % BLOCK:
        raise ValueError(f"Q4_1 needs in_features divisible by {BLOCK}, got {K}")
    g = w.float().reshape(N, K // BLOCK, BLOCK)
    lo, hi = g.amin(-1), g.amax(-1)
    d16, m16 = ((hi - lo) / 15).half(), lo.half()
    d, m = d16.float(), m16.float()
    q = torch.where(d[..., None] > 0, torch.round((g - m[..., None]) / d[..., None].clamp(min=1e-30)), 0.0)
    q = q.clamp(0, 15).to(torch.uint8)
    qs = q[..., :16] | (q[..., 16:] << 4)
    head = torch.stack([d16, m16], -1).contiguous().view(torch.uint8)  # [N, K/32, 4]: d then m, little endian
    return torch.cat([head, qs], -1).contiguous()


def unpack_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    """Dequantise [N, K/32, 20] Q4_1 blocks to float32 [N, K] (w = q * d + m), as the GGUF reader does."""
    from ..interop.gguf_reader import Q4_1, dequantize_blocks

    return dequantize_blocks(blocks.contiguous().reshape(-1), Q4_1).reshape(blocks.shape[0], -1)


def qlinear(ext, w: torch.Tensor, b: torch.Tensor | None, kind: str):
    """A native QLinear from a float weight [N, K] (float kinds share the tensor; int kinds quantise it)."""
    bias = torch.empty(0) if b is None else b.detach().float().contiguous()
    K = w.shape[1]
    if kind in ("float32", "bfloat16"):
        if w.dtype != getattr(torch, kind) or not w.is_contiguous():
            raise ValueError(f"native {kind} linear needs a contiguous {kind} weight, got {w.dtype}")
        return ext.QLinear(KINDS[kind], w.detach(), torch.empty(0), bias, K)
    if kind == "int8":
        q, s = pack_int8(w)
        return ext.QLinear(KINDS[kind], q, s, bias, K)
    if kind == "int4":
        return ext.QLinear(KINDS[kind], pack_q4_1(w), torch.empty(0), bias, K)
    raise ValueError(f"unknown native weight kind {kind!r}; choose one of {sorted(KINDS)}")


def _norm_tensors(norm, dtype=torch.float32):
    w = norm.weight.detach().float() + (norm.offset or 0.0)
    b = getattr(norm, "bias", None)
    return w.to(dtype).contiguous(), (torch.empty(0) if b is None else b.detach().float().contiguous())


class NativeStep:
    """One-token decode through the native Decoder; `kind` is the weight storage of its matmuls."""

    def __init__(self, ext, decoder, kind: str, linears: dict):
        self.ext, self.decoder, self.kind, self.linears = ext, decoder, kind, linears

    @classmethod
    def build(cls, model, fused: list[dict], head_w: torch.Tensor, head_b, kind: str):
        """`fused`: per layer {"qkv": (w, b), "o": (w, b), "up": (w, b), "down": (w, b), "glu", "act"} with
        float weights (the FastDecoder's fused tensors). Returns None when the extension or the model is not
        supported."""
        ext = load_extension()
        cfg = model.cfg
        if ext is None or cfg.logit_softcap is not None:
            return None  # FastDecoder.check_supported has refused the rest; the step applies no soft-cap
        layernorm, eps = cfg.norm == "layernorm", float(cfg.norm_eps)
        act = activation_base(cfg.activation)
        if any(f[k][0].shape[1] % BLOCK for f in fused for k in ("qkv", "o", "up", "down")):
            return None  # the kernels read whole 32-weight blocks (true of every released model's widths)
        layers, linears = [], []
        for blk, f in zip(model.layers, fused):
            lin = {k: qlinear(ext, *f[k], kind) for k in ("qkv", "o", "up", "down")}
            an_w, an_b = _norm_tensors(blk.attn_norm)
            mn_w, mn_b = _norm_tensors(blk.mlp_norm) if blk.mlp_norm is not None else (torch.empty(0), torch.empty(0))
            layers.append(ext.Layer(an_w, an_b, mn_w, mn_b, layernorm, eps, lin["qkv"], lin["o"], lin["up"],
                                    lin["down"], bool(f["glu"]), ACTS[act]))
            linears.append(lin)
        head = qlinear(ext, head_w, head_b, kind)
        fn_w, fn_b = _norm_tensors(model.norm)
        scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.head_dim ** -0.5
        dec = ext.Decoder(layers, fn_w, fn_b, layernorm, eps, head, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                          float(scale), cfg.pos == "rope")
        return cls(ext, dec, kind, {"layers": linears, "head": head})

    def step(self, model, ids: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """Logits [1, V] (float32) for one new token ids [1, 1]; writes its key/value into `cache`."""
        cfg = model.cfg
        x = model.embed(ids).float()
        if cfg.embed_scale is not None:
            x = x * cfg.embed_scale
        if cfg.pos == "learned":
            x = x + model.pos_embed(positions).float()
        if cfg.pos == "rope":
            cos, sin = model.rope_global(positions)
            cos, sin = cos.reshape(-1), sin.reshape(-1)
        else:
            cos = sin = torch.empty(0)
        pos = cache.length
        logits = self.decoder.step(x.reshape(-1), cos, sin, [k[0] for k in cache.k], [v[0] for v in cache.v], pos)
        cache.length = pos + 1
        return logits.view(1, -1)


def logit_stats(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logsumexp, first argmax) over the last dim of float32/bfloat16 logits [N, V]: one native sweep per row
    (csrc/logits.cpp), or PyTorch's logsumexp and argmax where the extension is unavailable."""
    ext = load_extension() if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.bfloat16) else None
    if ext is None or logits.dim() != 2:
        x = logits.float()
        return x.logsumexp(-1), x.argmax(-1)
    lse, arg = ext.logit_stats(logits)
    return lse, arg


def linear_fn(q):
    """A callable x[..., K] -> y[..., N] through a native QLinear (prefill with quantised weights)."""
    def run(x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return q(x.reshape(-1, shape[-1])).reshape(*shape[:-1], q.N).to(x.dtype)
    return run


__all__ = ["load_extension", "pack_int8", "pack_q4_1", "unpack_q4_1", "qlinear", "NativeStep", "linear_fn", "logit_stats"]
