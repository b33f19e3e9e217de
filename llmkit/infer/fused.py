"""A lean forward pass for decoding (survey §4.2.4 "efficiency"): the same math as `Transformer`, fewer kernels.

A decode step of a 135M model on a CPU costs less in matmuls than in launching ~2,000 small PyTorch ops
from Python. `FastDecoder` runs the common architecture family (pre-norm RMSNorm/LayerNorm, RoPE /
learned / no positions, MHA/GQA/MQA, GLU or plain MLP, optional biases, tied head, parallel block,
embedding scale, logit soft-cap) with about 20 ops per layer instead of ~75:
- q, k, v as one matmul and gate/up as one matmul (the model's q/k/v/gate/up weights become views of the
  fused tensors, so float weights are not duplicated);
- RoPE on q and k together as one batched matmul with a per-step rotation matrix R = diag(cos) + P diag(sin)
  (P the rotate-half permutation), built once per step and shared by every layer;
- attention through one `scaled_dot_product_attention(..., enable_gqa=True)` call into the model's own
  preallocated `KVCache`, so batching, `crop` and `reorder` work unchanged;
- only the last position is normalised and projected to the vocabulary.
With `quantize="int8" | "int4"` the fused matrices are quantised (quant.py) from the float weights.
Anything outside the family raises `Unsupported`, and the engine then keeps the model's own forward.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .native import NativeStep, linear_fn
from .quant import Int4Linear, Int8Linear


_HAS_MKLDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class Unsupported(ValueError):
    """The model uses a feature the fast path does not implement; use the model's forward instead."""


def check_supported(cfg) -> None:
    problems = {
        "arch": cfg.arch != "decoder", "norm_position": cfg.norm_position != "pre", "deepnorm": cfg.deepnorm,
        "qk_norm": cfg.qk_norm, "pos": cfg.pos not in ("rope", "learned", "none"),
        "rope_fraction": cfg.pos == "rope" and cfg.rope_fraction != 1.0, "rope_local_theta": cfg.rope_local_theta,
        "sliding_window": cfg.sliding_window, "attn_softcap": cfg.attn_softcap, "n_experts": cfg.n_experts,
        "final_norm": not cfg.final_norm, "block_pos": cfg.block_pos,
    }
    bad = [k for k, v in problems.items() if v]
    if bad:
        raise Unsupported(f"the fast decode path does not cover {bad}; the model's own forward is used")


def _rotate_half_matrix(hd: int) -> torch.Tensor:
    """P with x @ P = cat(-x2, x1) for x = cat(x1, x2) (the rotate-half layout of HF / GPT-NeoX RoPE)."""
    h = hd // 2
    P = torch.zeros(hd, hd)
    P[torch.arange(h) + h, torch.arange(h)] = -1.0
    P[torch.arange(h), torch.arange(h) + h] = 1.0
    return P


class FastDecoder:
    def __init__(self, model, quantize: str | None = None, group_size: int = 32, native: bool = True):
        cfg = model.cfg
        check_supported(cfg)
        self.model, self.cfg, self.quantize = model, cfg, quantize
        self.dtype = torch.bfloat16 if quantize else model.dtype
        self.h, self.kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else self.hd ** -0.5
        self.group_size = group_size
        raws = [self._raw(blk) for blk in model.layers]
        head_w = model.lm_head.weight if model.lm_head is not None else model.embed.weight
        head_b = getattr(model.lm_head, "bias", None)
        # the native one-call step (native.py) for batch-1 decoding; int4 there is Q4_1 with group 32
        kind = quantize or {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(model.dtype)
        use_native = native and kind is not None and (quantize != "int4" or group_size == 32)
        self.native = NativeStep.build(model, raws, head_w.detach(), head_b, kind) if use_native else None
        if self.native is not None and quantize:
            # prompts go through the same quantised weights (no second quantised copy)
            nat = self.native.linears
            self.layers = [{**r, **{k: linear_fn(nat["layers"][i][k]) for k in ("qkv", "o", "up", "down")}}
                           for i, r in enumerate(raws)]
            self.head = linear_fn(nat["head"])
        else:
            self.layers = [{**r, **{k: self._linear(*r[k]) for k in ("qkv", "o", "up", "down")}} for r in raws]
            self.head = self._linear(head_w, head_b)
        self.final_norm = self._norm(model.norm)
        self.P = _rotate_half_matrix(self.hd).to(model.device) if cfg.pos == "rope" else None

    # ------------------------------------------------------------------ building
    def _linear(self, w: torch.Tensor, b: torch.Tensor | None):
        if self.quantize == "int8":
            return Int8Linear(w, b)
        if self.quantize == "int4":
            return Int4Linear(w, b, self.group_size)
        b = None if b is None else b.detach()
        if self.dtype == torch.bfloat16 and w.device.type == "cpu" and _HAS_MKLDNN:
            # oneDNN's prepacked bfloat16 weights: ~1.7x faster than F.linear for one-row inputs here
            # (bench/decode.py; float32 gains nothing from packing). Costs a packed copy of the weight.
            packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1)
            return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
        return partial(F.linear, weight=w.detach(), bias=b)

    def _fuse(self, mods: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One weight for several linears on the same input; in float the originals become views of it."""
        w = torch.cat([m.weight.detach() for m in mods])
        b = None if mods[0].bias is None else torch.cat([m.bias.detach() for m in mods])
        if self.quantize is None:
            start = 0
            for m in mods:  # re-point the model's parameters into the fused storage: no duplicate weights
                n = m.weight.shape[0]
                m.weight = nn.Parameter(w[start:start + n], requires_grad=False)
                if b is not None:
                    m.bias = nn.Parameter(b[start:start + n], requires_grad=False)
                start += n
        return w, b

    def _norm(self, norm):
        w = norm.weight.detach().float() + norm.offset if norm.offset else norm.weight.detach()
        w = w.to(self.dtype)
        if norm.kind == "layernorm":
            b = None if norm.bias is None else norm.bias.detach().to(self.dtype)
            return partial(F.layer_norm, normalized_shape=(w.shape[0],), weight=w, bias=b, eps=norm.eps)
        return partial(F.rms_norm, normalized_shape=(w.shape[0],), weight=w, eps=norm.eps)

    def _raw(self, blk) -> dict:
        """The layer's float weights, (w, b) per fused matmul, and its norms and activation."""
        a, m = blk.attn, blk.mlp
        if not all(isinstance(x, nn.Linear) for x in (a.q, a.k, a.v, a.o, m.up, m.down)):
            raise Unsupported("build the fast path from float weights (before quantize_model); pass quantize= here")
        return {
            "attn_norm": self._norm(blk.attn_norm),
            "qkv": self._fuse([a.q, a.k, a.v]),
            "o": (a.o.weight.detach(), None if a.o.bias is None else a.o.bias.detach()),
            "mlp_norm": None if blk.mlp_norm is None else self._norm(blk.mlp_norm),
            "up": self._fuse([m.gate, m.up]) if m.glu else (m.up.weight.detach(), None if m.up.bias is None
                                                             else m.up.bias.detach()),
            "down": (m.down.weight.detach(), None if m.down.bias is None else m.down.bias.detach()),
            "act": m.act, "glu": m.glu, "layer": blk.layer,
        }

    # ------------------------------------------------------------------ running
    def _rotation(self, positions: torch.Tensor) -> torch.Tensor | None:
        """R [B, T, hd, hd] such that x @ R applies RoPE at those positions (the model's own cos/sin tables)."""
        if self.P is None:
            return None
        cos, sin = self.model.rope_global(positions)  # [B, 1, T, hd] float32, scaling and mscale included
        cos, sin = cos[:, 0], sin[:, 0]
        return torch.diag_embed(cos) + self.P * sin.unsqueeze(-2)  # float32: small bf16 bmm is 2x slower

    def _attention(self, x, L, ctx):
        B, T, _ = x.shape
        h, kv, hd = self.h, self.kv, self.hd
        qkv = L["qkv"](L["attn_norm"](x))
        qk = qkv[..., :(h + kv) * hd].view(B, T, h + kv, hd)
        if ctx["R"] is not None:
            qk = (qk.float() @ ctx["R"]).to(x.dtype)  # [B,T,h+kv,hd] @ [B,T,hd,hd]: one rotation per (row, pos)
        q = qk[:, :, :h].transpose(1, 2)
        k = qk[:, :, h:].transpose(1, 2)
        v = qkv[..., (h + kv) * hd:].view(B, T, kv, hd).transpose(1, 2)
        cache, s, e = ctx["cache"], ctx["start"], ctx["start"] + T
        cache.k[L["layer"]][:, :, s:e] = k
        cache.v[L["layer"]][:, :, s:e] = v
        K, V = cache.k[L["layer"]][:, :, :e], cache.v[L["layer"]][:, :, :e]
        out = F.scaled_dot_product_attention(q, K, V, attn_mask=ctx["mask"], is_causal=ctx["causal"],
                                             scale=self.scale, enable_gqa=kv != h)
        return L["o"](out.transpose(1, 2).reshape(B, T, h * hd))

    def _mlp(self, x, L):
        if L["glu"]:
            g, u = L["up"](x).chunk(2, dim=-1)
            return L["down"](L["act"](g) * u)
        return L["down"](L["act"](L["up"](x)))

    def _mask(self, start: int, T: int, attn_mask: torch.Tensor | None, device) -> tuple[torch.Tensor | None, bool]:
        if attn_mask is None and (T == 1 or start == 0):
            return None, T > 1  # no padding: no mask for one new token, SDPA's causal kernel for a prompt
        q = torch.arange(start, start + T, device=device).view(1, 1, T, 1)
        k = torch.arange(start + T, device=device).view(1, 1, 1, -1)
        allowed = k <= q
        if attn_mask is not None:
            # a padding query would see no key; letting it see itself keeps the row finite (as the model does)
            allowed = (allowed & attn_mask[:, None, None, :].bool()) | (k == q)
        return allowed, False

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, *, positions: torch.Tensor, cache, attn_mask: torch.Tensor | None = None,
                 last_only: bool = True) -> torch.Tensor:
        """Logits [B, V] for the last position (or [B, T, V]); writes the new keys/values into `cache`."""
        cfg, model = self.cfg, self.model
        B, T = ids.shape
        if self.native is not None and B == 1 and T == 1 and attn_mask is None and cache.k[0].is_contiguous():
            logits = self.native.step(model, ids, positions, cache)  # float32 [1, V]
            return logits if last_only else logits[:, None]
        start = cache.length
        x = model.embed(ids)
        if cfg.embed_scale is not None:
            x = x * torch.tensor(cfg.embed_scale, dtype=x.dtype)
        if cfg.pos == "learned":
            x = x + model.pos_embed(positions)
        x = x.to(self.dtype)
        mask, causal = self._mask(start, T, attn_mask, ids.device)
        ctx = {"cache": cache, "start": start, "R": self._rotation(positions), "mask": mask, "causal": causal}
        for L in self.layers:
            if L["mlp_norm"] is None:  # parallel block: attention and MLP read the same normalised input
                x = x + self._attention(x, L, ctx) + self._mlp(L["attn_norm"](x), L)
            else:
                x = x + self._attention(x, L, ctx)
                x = x + self._mlp(L["mlp_norm"](x), L)
        cache.length = start + T
        x = self.final_norm(x[:, -1] if last_only else x)
        logits = self.head(x)
        if cfg.logit_softcap is not None:
            logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
        return logits


def enable_fast_decode(model, quantize: str | None = None, group_size: int = 32, native: bool = True) -> bool:
    """Attach a FastDecoder as `model.fast_decoder` (the engine then uses it); False when unsupported.

    With `quantize`, the model's own linears are quantised too (for paths the fast decoder does not take:
    beam search, speculative decoding), so the float weights are released.
    """
    try:
        fast = FastDecoder(model, quantize, group_size, native)
    except Unsupported:
        if quantize:
            from .quant import quantize_model

            quantize_model(model, quantize, group_size=group_size)
        return False
    if quantize:
        from .quant import quantize_model

        quantize_model(model, quantize, group_size=group_size)
    model.__dict__["fast_decoder"] = fast  # a plain attribute: not a submodule, not in state_dict()
    return True
