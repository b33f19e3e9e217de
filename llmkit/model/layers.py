"""Building blocks of survey §4.2.2 (Table 4): normalisation, activations, feed-forward, positions.

Implements:
- LayerNorm and RMSNorm (with Gemma's (1 + w) offset), biases optional;
- ReLU, GELU (erf and tanh), SiLU/Swish and the GLU family (SwiGLU, GeGLU, ReGLU) in one `MLP`;
- absolute positions (learned, sinusoidal [Vaswani et al. 2017]), RoPE tables [Su et al. 2021]
  with scaling, ALiBi slopes and bias [Press et al. 2022], T5 relative-position buckets [Raffel et al. 2020].
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, rope_inv_freq


class Norm(nn.Module):
    """LayerNorm (x-mu)/sigma*g+b or RMSNorm x/rms(x)*(offset+g); computed in float32 like the references."""

    def __init__(self, dim: int, kind: str = "rmsnorm", eps: float = 1e-5, bias: bool = True, offset: float = 0.0):
        super().__init__()
        self.kind, self.eps, self.offset = kind, eps, offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if kind == "layernorm" and bias else None

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, norm(h)) with h = x + delta (h = x when delta is None): a pre-norm residual add and the norm after
        it. Float32 RMSNorm on CPU does both in one native pass each way; the values and gradients are those of
        `h = x + delta; self(h)` to the bit."""
        if delta is None:
            return x, self(x)
        if self.kind == "rmsnorm" and delta.shape == x.shape and fused_f32(x, delta, self.weight) is not None:
            return _NativeAddRMSNorm.apply(x, delta, self.weight, self.eps, self.offset)
        h = x + delta
        return h, self(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        if fused_f32(x, self.weight) is not None:
            return _NativeRMSNorm.apply(x, self.weight, self.eps, self.offset)
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _RMSNormGrad.apply(x, self.weight, self.eps, self.offset)
        xh, _, w = _rms_parts(x, self.weight, self.eps, self.offset)
        return (xh * w).to(x.dtype)


def _rms_parts(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float):
    """float32 x * r, r = rsqrt(mean(x^2) + eps), and the (offset) weight: the one RMSNorm arithmetic of the
    inference path and the training Function, so a model's output does not depend, to the last bit, on
    whether its weights require gradients (frozen base vs adapter, DPO policy vs reference)."""
    xf = x.float()
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    w = weight.float() + offset if offset else weight.float()
    return xf * r, r, w


class _RMSNormGrad(torch.autograd.Function):
    """RMSNorm for training with the backward written out (same float32 arithmetic as `Norm.forward`):
    with xh = x * r, r = rsqrt(mean(x^2) + eps), y = xh * w:
    dw = sum_rows(dy * xh), dx = r * (dy*w - xh * mean(dy*w * xh)). Autograd would save and replay
    the pow, mean, rsqrt and the two products one by one (about twice the passes over [N, d])."""

    @staticmethod
    def forward(ctx, x, weight, eps: float, offset: float):
        xh, r, w = _rms_parts(x, weight, eps, offset)  # xh kept for the backward: one [N, d] pass less there
        ctx.save_for_backward(xh, r, w)
        ctx.wdtype, ctx.xdtype = weight.dtype, x.dtype
        y = xh * w
        # no `.to` when the dtype already matches: under torch.compile in torch 2.11 a Function whose forward
        # returns such a no-op cast got all-zero gradients (tests/train/test_trainer.py's compile test; the
        # returned alias of an intermediate misroutes the gradient: pytorch/pytorch#180642)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        xh, r, w = ctx.saved_tensors
        dyf = dy.float()
        dw = (dyf * xh).flatten(0, -2).sum(0) if ctx.needs_input_grad[1] else None
        gx = dyf * w
        m = torch.linalg.vecdot(gx, xh).unsqueeze_(-1).div_(xh.shape[-1])
        dx = gx.addcmul_(xh, m, value=-1).mul_(r)
        return dx.to(ctx.xdtype), (dw.to(ctx.wdtype) if dw is not None else None), None, None


def fused_f32(*tensors: torch.Tensor):
    """The native extension when its fused float32 kernels (llmkit/infer/csrc/train_ops.cpp: RMSNorm, SwiGLU,
    RoPE, forward and backward) apply to these tensors: all plain float32 CPU tensors or parameters, not under
    torch.compile (which fuses the plain ops itself), extension built. Training and inference take the same
    kernels, so float32 outputs do not depend on whether gradients are needed. None elsewhere, subclasses
    included: the kernels read raw memory, and a DTensor shard or tensor parallelism's AsyncCollectiveTensor
    (which waits for its all-reduce only when a torch op reads it) must go through torch ops."""
    if torch.compiler.is_compiling() or any(type(t) not in _PLAIN or t.dtype != torch.float32 or t.device.type != "cpu"
                                            for t in tensors):
        return None
    return native_ext()


_PLAIN = (torch.Tensor, nn.Parameter)


def native_ext():
    """The compiled native extension (llmkit/infer/native.py; built at first use, cached), or None."""
    if not _NATIVE:  # imported here (llmkit.infer.native imports this module); looked up once, not per call
        from ..infer.native import load_extension

        _NATIVE.append(load_extension)
    return _NATIVE[0]()


_NATIVE: list = []


class _NativeRMSNorm(torch.autograd.Function):
    """RMSNorm through the fused native kernels (one pass each way; see `_RMSNormGrad` for the formulas)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float, offset: float):
        w = (weight + offset if offset else weight).contiguous()
        y, r = native_ext().rmsnorm_fwd(x, w, eps)
        ctx.save_for_backward(x, w, r)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, r = ctx.saved_tensors
        dx, dw = native_ext().rmsnorm_bwd(dy, x, w, r)
        return dx, (dw if ctx.needs_input_grad[1] else None), None, None


class _NativeAddRMSNorm(torch.autograd.Function):
    """(h, RMSNorm(h)) with h = x + delta in one native pass; the backward adds the gradient that reaches h along
    the residual stream into the norm's own (what autograd's add would do), again in one pass. Both inputs
    get that same gradient, as through `x + delta`."""

    @staticmethod
    def forward(ctx, x, delta, weight, eps: float, offset: float):
        w = (weight + offset if offset else weight).contiguous()
        y, r, h = native_ext().rmsnorm_fwd(x, w, eps, delta)
        ctx.save_for_backward(h, w, r)
        ctx.set_materialize_grads(False)
        return h, y

    @staticmethod
    def backward(ctx, dh, dy):
        h, w, r = ctx.saved_tensors
        if dy is None:  # only the sum is used further
            return dh, dh, None, None, None
        dx, dw = native_ext().rmsnorm_bwd(dy, h, w, r, dh)
        return dx, dx, (dw if ctx.needs_input_grad[2] else None), None, None


class _NativeSwiGLU(torch.autograd.Function):
    """silu(gate) * up through the fused native kernels."""

    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return native_ext().swiglu_fwd(g, u)

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        return tuple(native_ext().swiglu_bwd(dh, g, u))


class _NativeRope(torch.autograd.Function):
    """Full-width RoPE through the native kernel; the backward is the rotation by -sin (see `_RopeGrad`)."""

    @staticmethod
    def forward(ctx, x, c, s):
        ctx.save_for_backward(c, s)
        return native_ext().rope(x, c, s, False)

    @staticmethod
    def backward(ctx, g):
        c, s = ctx.saved_tensors
        return native_ext().rope(g, c, s, True), None, None


def make_norm(cfg: ModelConfig, dim: int | None = None) -> Norm:
    return Norm(dim or cfg.d_model, cfg.norm, cfg.norm_eps, cfg.norm_bias, cfg.norm_offset)


def activation_base(name: str) -> str:
    """The elementwise function of an activation name: swiglu -> silu, geglu(_tanh) -> gelu(_tanh), reglu -> relu."""
    return name.replace("swiglu", "silu").replace("geglu_tanh", "gelu_tanh").replace("geglu", "gelu").replace("reglu", "relu")


def activation_fn(name: str):
    base = activation_base(name)
    if base == "relu":
        return F.relu
    if base == "gelu":
        return F.gelu
    if base == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if base == "silu":
        return F.silu
    raise ValueError(f"unknown activation {name!r}")


class MLP(nn.Module):
    """Position-wise FFN: down(act(up x)) or, for GLU variants, down(act(gate x) * up x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f, b = cfg.d_model, cfg.d_ff, cfg.mlp_bias
        self.glu = cfg.is_glu
        self.act = activation_fn(cfg.activation)
        self.gate = nn.Linear(d, f, bias=b) if self.glu else None
        self.up = nn.Linear(d, f, bias=b)
        self.down = nn.Linear(f, d, bias=b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.glu:
            g, u = self.gate(x), self.up(x)
            if self.act is F.silu and fused_f32(g, u) is not None:
                return self.down(_NativeSwiGLU.apply(g, u))
            return self.down(self.act(g) * u)
        return self.down(self.act(self.up(x)))


def sinusoidal_table(n: int, d: int) -> torch.Tensor:
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    pe = torch.zeros(n, d)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div[: d // 2])
    return pe


class Rotary(nn.Module):
    """cos/sin tables for RoPE, cached and grown on demand; one instance per distinct base."""

    def __init__(self, cfg: ModelConfig, theta: float):
        super().__init__()
        inv, self.mscale = rope_inv_freq(cfg, theta)
        self.register_buffer("inv_freq", inv, persistent=False)
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self._grow(cfg.max_seq_len)

    def _grow(self, n: int) -> None:
        t = torch.arange(n, dtype=torch.float32, device=self.inv_freq.device)
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos = emb.cos() * self.mscale
        self.sin = emb.sin() * self.mscale

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, 1, T, rot_dim] (float32)."""
        # growing needs the largest position on the host: a device sync, and a graph break under torch.compile,
        # whose traced steps use the tables built for max_seq_len at init (a position past them fails to index)
        if not torch.compiler.is_compiling():
            need = int(positions.max()) + 1 if positions.numel() else 0
            if need > self.cos.shape[0]:
                self._grow(max(need, 2 * self.cos.shape[0]))
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rot_dim channels of x [B, H, T, hd] (rotate-half layout, as in HF/NeoX)."""
    # under torch.compile the plain ops are traced and fused instead (the out= writes into slices of
    # `_rope_halves` do not survive AOT autograd's functionalisation)
    compiling = torch.compiler.is_compiling()
    if fused_f32(x, cos) is not None and (half := _half_tables(x, cos, sin)) is not None:
        return _NativeRope.apply(x, *half)
    if torch.is_grad_enabled() and x.requires_grad and not compiling:
        return _RopeGrad.apply(x, cos, sin)
    # float32/float64 are their own compute type: the training Function's two-halves arithmetic, so outputs
    # are bit-identical with and without gradients (and no rotated copy); bfloat16 rotates in float32
    tables = _half_tables(x, cos, sin) if x.dtype in (torch.float32, torch.float64) and not compiling else None
    return _rope_halves(x, *tables) if tables else _rope(x, cos, sin)


def _half_tables(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """cos/sin of the first half in x's dtype when the rotation spans the whole head (`_rope_halves`), else None
    (partial rotation)."""
    if cos.shape[-1] != x.shape[-1]:
        return None
    half = cos.shape[-1] // 2
    return cos[..., :half].to(x.dtype), sin[..., :half].to(x.dtype)


class _RopeGrad(torch.autograd.Function):
    """RoPE with a hand-written backward for training: a rotation's transpose is the rotation by the
    opposite angle, so d/dx is one more rotation with -sin (valid because `Rotary` tables repeat the
    same frequencies in both halves). Autograd would otherwise record and replay the chunk, neg, cat,
    casts and products of `_rope` one by one. Full-width rotation runs on the two halves in the input's
    dtype (four half-size passes, no rotated copy), like transformers' Llama under autocast; partial
    rotation keeps `_rope`."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        tables = _half_tables(x, cos, sin)
        ctx.fast = tables is not None
        ctx.save_for_backward(*(tables or (cos, sin)))
        return _rope_halves(x, *tables) if tables else _rope(x, cos, sin)

    @staticmethod
    def backward(ctx, g):
        c, s = ctx.saved_tensors
        return (_rope_halves(g, c, -s) if ctx.fast else _rope(g, c, -s)), None, None


def _rope_halves(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """[x1 c - x2 s, x2 c + x1 s] for x = [x1, x2] along the last dim (c, s: half-width tables); the result
    is contiguous in x's shape (the [B, H, T, hd] layout attention reads without another copy)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.mul(x1, c, out=out[..., :half]).addcmul_(x2, s, value=-1)
    torch.mul(x2, c, out=out[..., half:]).addcmul_(x1, s)
    return out


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot = cos.shape[-1]
    xr, xp = (x[..., :rot], x[..., rot:]) if rot < x.shape[-1] else (x, None)
    x1, x2 = xr.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    ct = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for float64 inputs
    out = (xr.to(ct) * cos + rotated.to(ct) * sin).to(x.dtype)
    return out if xp is None else torch.cat([out, xp], dim=-1)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Geometric slopes 2^(-8i/h) (Press et al. 2022); non-powers of two interleave the next power's slopes."""

    def pow2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_heads).is_integer():
        return torch.tensor(pow2(n_heads))
    closest = 2 ** math.floor(math.log2(n_heads))
    return torch.tensor(pow2(closest) + pow2(2 * closest)[0::2][: n_heads - closest])


def alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """-m * (i - j) for q positions [B, Tq] and key positions [B, Tk] -> [B, H, Tq, Tk]."""
    dist = (q_pos[:, :, None] - k_pos[:, None, :]).abs().float()
    return -slopes.view(1, -1, 1, 1).to(dist.device) * dist[:, None]


def t5_bucket(rel: torch.Tensor, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """T5's relative-position bucket function (same arithmetic as transformers' T5Attention)."""
    ret = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        ret = ret + (rel > 0).long() * num_buckets
        n = rel.abs()
    else:
        n = -torch.clamp(rel, max=0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    large = max_exact + (
        torch.log(n.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return ret + torch.where(is_small, n, large)


class T5Bias(nn.Module):
    """Learned scalar bias per (bucket, head), shared by all layers of a stack (T5)."""

    def __init__(self, cfg: ModelConfig, bidirectional: bool):
        super().__init__()
        self.bidirectional = bidirectional
        self.nb, self.md = cfg.t5_num_buckets, cfg.t5_max_distance
        self.emb = nn.Embedding(cfg.t5_num_buckets, cfg.n_heads)

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        rel = k_pos[:, None, :] - q_pos[:, :, None]  # memory - query, as in T5
        b = t5_bucket(rel, self.bidirectional, self.nb, self.md)
        return self.emb(b).permute(0, 3, 1, 2)  # [B, H, Tq, Tk]
