"""Attention of survey §4.2.2: MHA / GQA / MQA, masks (causal, prefix, sliding window), KV cache.

Implements:
- `KVCache`: preallocated per-layer key/value tensors [B, n_kv, max_len, hd]; `crop` (speculative
  decoding roll-back) and `reorder` (beam search) without copies of the whole history;
- `build_mask`: one boolean mask from causal order, a bidirectional prefix (prefix LM, GLM),
  a sliding window (Mistral, Gemma) and key padding, in "slot" coordinates of the cache;
- `Attention`: q/k/v projections with optional biases and QK-norm, RoPE, additive position biases
  (ALiBi, T5), soft-capping (Gemma 2), and `scaled_dot_product_attention` whenever no soft-cap is set;
- `CausalAttention`: the training path of plain causal attention on CPU in bf16 (batched matmuls that run on
  AMX and a hand-written backward; torch's CPU flash-attention backward is ~2.5x slower at these shapes);
- `native_causal_attention`: plain causal self-attention on CPU in float32, with or without gradients, through
  the native kernel (llmkit/infer/csrc/attention.cpp: causal blocks only, scores in L2, BLAS sgemm; forward
  ~1.7x and forward + backward ~1.9x SDPA's CPU flash kernel at T = 256, hd = 64), registered as a torch
  custom op so that torch.compile keeps it whole.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import apply_rope, make_norm, native_ext


class KVCache:
    """Preallocated key/value storage; `length` slots are filled (same for every batch row)."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype=torch.float32, device="cpu", n_layers=None):
        n = n_layers or cfg.n_layers
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)]
        self.max_len, self.length, self.batch = max_len, 0, batch
        self.cross: list | None = None  # encoder-decoder: cached cross-attention (k, v) per layer

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t0, t1 = self.length, self.length + k.shape[2]
        if t1 > self.max_len:
            raise RuntimeError(f"KV cache full: {t1} > max_len={self.max_len}; allocate a longer cache")
        self.k[layer][:, :, t0:t1] = k
        self.v[layer][:, :, t0:t1] = v
        return self.k[layer][:, :, :t1], self.v[layer][:, :, :t1]

    def crop(self, length: int) -> None:
        self.length = min(self.length, length)

    def reorder(self, index: torch.Tensor) -> None:
        for lst in (self.k, self.v):
            for i, t in enumerate(lst):
                lst[i] = t.index_select(0, index)
        if self.cross is not None:
            self.cross = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.cross]
        self.batch = int(index.numel())


def build_mask(
    q_slots: torch.Tensor,
    k_slots: torch.Tensor,
    *,
    causal: bool = True,
    prefix_len: torch.Tensor | None = None,
    window: int | None = None,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean mask [B|1, 1, Tq, Tk]; True = may attend.

    q_slots [Tq], k_slots [Tk] are cache slot indices; prefix_len [B] makes slots < prefix_len
    bidirectional (prefix decoder); window keeps keys with q - k < window; key_valid [B, Tk] drops padding
    ([B, Tq, Tk]: a pairwise mask, e.g. block-diagonal per packed document).
    """
    q = q_slots.view(1, 1, -1, 1)
    k = k_slots.view(1, 1, 1, -1)
    allowed = (k <= q) if causal else torch.ones(1, 1, q.shape[2], k.shape[3], dtype=torch.bool, device=q.device)
    if prefix_len is not None and causal:
        p = prefix_len.view(-1, 1, 1, 1)
        allowed = allowed | ((k < p) & (q < p))
    if window is not None:
        allowed = allowed & ((q - k) < window)
    if key_valid is not None:
        # [B, Tk] key padding; or [B, Tq, Tk] pairwise (document-aware masking of packed sequences)
        kv = key_valid[:, None, None, :] if key_valid.dim() == 2 else key_valid[:, None]
        allowed = allowed & kv.bool()
        # a padding query would see no key at all, and SDPA turns an empty row into NaN that then
        # leaks through V; letting every slot see itself keeps such rows finite (HF does the same).
        allowed = allowed | (k == q)
    return allowed


_CAUSAL_BIAS: dict = {}


def _causal_bias(T: int, rep: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive causal mask [rep*T, T] (0 on and below the diagonal, -inf above), cached per shape."""
    key = (T, rep, dtype)
    if key not in _CAUSAL_BIAS:
        _CAUSAL_BIAS[key] = torch.full((T, T), float("-inf"), dtype=dtype).triu_(1).repeat(rep, 1)
    return _CAUSAL_BIAS[key]


class CausalAttention(torch.autograd.Function):
    """softmax(Q K^T * scale + causal) V with the backward written out (FlashAttention paper, Alg. 4, unblocked):
    dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dP * P)) (= torch's softmax backward, one fused kernel),
    dQ = dS K * scale, dK = dS^T Q * scale. GQA: the `rep` query heads of one key/value head are stacked
    along the rows, so each K/V head is used in place and dK/dV sum over its group inside the matmul.
    P is kept for the backward (B*H*T*T values: 6 MB per layer at the bench shapes in bf16)."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float):
        B, H, T, D = q.shape
        KV = k.shape[1]
        rep = H // KV
        qg, kg, vg = q.reshape(B * KV, rep * T, D), k.reshape(B * KV, T, D), v.reshape(B * KV, T, D)
        # the mask is added by the matmul itself (beta=1 on the bias, alpha=scale on Q K^T): one pass less
        p = torch.baddbmm(_causal_bias(T, rep, q.dtype), qg, kg.transpose(1, 2), alpha=scale).softmax(-1)
        # torch.compile refuses to save a reshape that may alias the inputs: there the inputs are saved and
        # regrouped again in the backward
        ctx.regroup = torch.compiler.is_compiling()
        ctx.save_for_backward(*((q, k, v) if ctx.regroup else (qg, kg, vg)), p)
        ctx.scale, ctx.shapes = scale, (q.shape, k.shape)
        return torch.bmm(p, vg).view(B, H, T, D)

    @staticmethod
    def backward(ctx, do):
        qg, kg, vg, p = ctx.saved_tensors
        qshape, kshape = ctx.shapes
        if ctx.regroup:
            B, KV, T, D = kshape
            qg, kg, vg = qg.reshape(B * KV, -1, D), kg.reshape(B * KV, T, D), vg.reshape(B * KV, T, D)
        dog = do.reshape(qg.shape)
        dv = torch.bmm(p.transpose(1, 2), dog)
        ds = torch._softmax_backward_data(torch.bmm(dog, vg.transpose(1, 2)), p, -1, p.dtype)
        dq = torch.baddbmm(qg, ds, kg, beta=0, alpha=ctx.scale)  # beta=0: the first argument only gives the shape
        dk = torch.baddbmm(kg, ds.transpose(1, 2), qg, beta=0, alpha=ctx.scale)
        return dq.view(qshape), dk.view(kshape), dv.view(kshape), None


# The training attention kernels keep the [B*H, T, T] probabilities of every layer for the backward; above this
# many bytes per layer the O(T) memory of SDPA's flash kernel matters more than their speed
MAX_SAVED_SCORE_BYTES = 64 << 20


def _whole_sequence_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Self-attention over the whole sequence on CPU (no cache, so Tq == Tk), one dtype, whole GQA groups, and
    probabilities within MAX_SAVED_SCORE_BYTES: where the CPU training kernels apply."""
    B, H, T, _ = q.shape
    return (q.device.type == "cpu" and q.dtype == k.dtype == v.dtype and T == k.shape[2] and H % k.shape[1] == 0
            and B * H * T * T * q.element_size() <= MAX_SAVED_SCORE_BYTES)


def use_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Where `CausalAttention` applies and pays: training (grad on) in bf16 where `_whole_sequence_cpu` holds
    (at the bench shapes, B=8, H=6, T=256, hd=64, one core: ~13 ms fwd+bwd vs SDPA's ~32 ms). float32 takes
    `native_causal_attention` instead."""
    return (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
            and q.dtype == torch.bfloat16 and _whole_sequence_cpu(q, k, v))


@torch.library.custom_op("llmkit::causal_attention_f32", mutates_args=())
def _native_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, save: bool) -> list[torch.Tensor]:
    out, p = native_ext().causal_attention_fwd(q, k, v, scale, save)
    return [out, p]


@_native_fwd.register_fake
def _(q, k, v, scale, save):
    B, H, T, D = q.shape
    return [q.new_empty(B, T, H, D).transpose(1, 2), q.new_empty((B, H, T, T) if save else (0,))]


@torch.library.custom_op("llmkit::causal_attention_f32_bwd", mutates_args=())
def _native_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                p: torch.Tensor, scale: float) -> list[torch.Tensor]:
    return list(native_ext().causal_attention_bwd(do, q, k, v, out, p, scale))


@_native_bwd.register_fake
def _(do, q, k, v, out, p, scale):
    B, H, T, D = q.shape
    KV = k.shape[1]
    return [q.new_empty(B, T, H, D).transpose(1, 2), *(q.new_empty(B, T, KV, D).transpose(1, 2) for _ in "kv")]


def _native_setup(ctx, inputs, output):
    q, k, v, scale, _ = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.scale = scale
    ctx.set_materialize_grads(False)  # P has no gradient: no [B, H, T, T] zeros for it


def _native_grad(ctx, grads):
    q, k, v, out, p = ctx.saved_tensors
    do = grads[0]
    if do is None:
        return None, None, None, None, None
    dq, dk, dv = _native_bwd(do, q, k, v, out, p, ctx.scale)  # the kernel makes D unit-stride itself
    return dq, dk, dv, None, None


_native_fwd.register_autograd(_native_grad, setup_context=_native_setup)


def native_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(Q K^T * scale + causal) V in float32 on CPU (q [B, H, T, D], k/v [B, KV, T, D]); the output is a
    [B, H, T, D] view of a [B, T, H, D] tensor, so merging the heads afterwards costs no copy. The
    probabilities are kept for the backward only when a gradient is needed."""
    save = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return _native_fwd(q, k, v, scale, save)[0]


def use_native_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Where `native_causal_attention` applies: float32 where `_whole_sequence_cpu` holds and the native extension
    is built with a BLAS sgemm. With and without gradients alike, so a model's float32 output does not depend on
    whether its weights train (frozen base vs adapter, DPO reference vs policy)."""
    return q.dtype == torch.float32 and _whole_sequence_cpu(q, k, v) and _native_available()


@torch.compiler.assume_constant_result  # a fixed property of this process: no graph break under torch.compile
def _native_available() -> bool:
    ext = native_ext()
    return ext is not None and bool(ext.attention_available())


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, cross: bool = False):
        super().__init__()
        self.cfg, self.layer, self.cross = cfg, layer, cross
        h, kv, hd, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
        self.n_heads, self.n_kv, self.hd = h, kv, hd
        self.q = nn.Linear(d, h * hd, bias=cfg.qkv_bias)
        self.k = nn.Linear(d, kv * hd, bias=cfg.qkv_bias)
        self.v = nn.Linear(d, kv * hd, bias=cfg.qkv_bias)
        self.o = nn.Linear(h * hd, d, bias=cfg.attn_out_bias)
        self.q_norm = make_norm(cfg, hd) if cfg.qk_norm else None
        self.k_norm = make_norm(cfg, hd) if cfg.qk_norm else None
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else hd**-0.5
        self.window = cfg.sliding_window if (cfg.layer_type(layer) == "local" and not cross) else None

    def forward(
        self,
        x: torch.Tensor,
        *,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        cache: KVCache | None = None,
        memory: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, -1, self.hd).transpose(1, 2)  # -1: local heads under tensor parallelism
        if self.cross and cache is not None and cache.cross is not None and cache.cross[self.layer] is not None:
            k, v = cache.cross[self.layer]  # encoder memory projected once per generation
        else:
            src = memory if self.cross else x
            S = src.shape[1]
            k = self.k(src).view(B, S, -1, self.hd).transpose(1, 2)
            v = self.v(src).view(B, S, -1, self.hd).transpose(1, 2)
            if self.k_norm is not None:
                k = self.k_norm(k)
            if rope is not None and not self.cross:
                k = apply_rope(k, *rope)
            if cache is not None and not self.cross:
                k, v = cache.update(self.layer, k, v)
            elif cache is not None and cache.cross is not None:
                cache.cross[self.layer] = (k, v)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if rope is not None and not self.cross:
            q = apply_rope(q, *rope)
        gqa = k.shape[1] != q.shape[1]
        plain_causal = self.cfg.attn_softcap is None and mask is None and bias is None and is_causal
        if plain_causal and use_causal_attention(q, k, v):
            out = CausalAttention.apply(q, k, v, self.scale)
        elif plain_causal and use_native_attention(q, k, v):
            out = native_causal_attention(q, k, v, self.scale)
        elif self.cfg.attn_softcap is None:
            attn_mask = mask
            if bias is not None:
                attn_mask = bias.to(q.dtype) if mask is None else bias.to(q.dtype).masked_fill(~mask, float("-inf"))
            # enable_gqa: each key/value head serves its group of query heads in place (no repeated K/V copy
            # of the whole cache per layer)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=is_causal and attn_mask is None, scale=self.scale,
                enable_gqa=gqa,
            )
        else:
            if gqa:
                rep = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            out = self._manual(q, k, v, mask, bias, is_causal)
        out = out.transpose(1, 2).reshape(B, T, -1)
        return self.o(out)

    def _manual(self, q, k, v, mask, bias, is_causal):
        scores = (q.float() @ k.float().transpose(-1, -2)) * self.scale
        c = self.cfg.attn_softcap
        scores = c * torch.tanh(scores / c)
        if bias is not None:
            scores = scores + bias.float()
        if mask is None and is_causal:
            Tq, Tk = scores.shape[-2:]
            mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return (scores.softmax(-1) @ v.float()).to(q.dtype)
