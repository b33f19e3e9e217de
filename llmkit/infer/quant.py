"""Weight-only quantisation for CPU decoding (survey §5.4 "memory-efficient model adaptation", §4.2.4).

Implements `quantize_model(model, "int8" | "int4", group_size=...)`, which replaces every `nn.Linear`
(and the tied embedding's output projection) with a quantised module, and the two formats:
- int8, per output channel, symmetric: W ≈ q * s, q in [-127, 127], s = max|W_row| / 127 (LLM.int8's
  vector-wise scheme without the outlier split). Matmul: `torch.ops.aten._weight_int8pack_mm`, which
  reads the int8 weight directly (activations in bfloat16: its float32 path is not vectorised).
- int4, group-wise, asymmetric: per group of `group_size` input channels W ≈ q * s + m, q in [0, 15]
  with s = (max - min) / 15, m = min (GGUF's Q4_1, GPTQ/AWQ's storage format). Matmul:
  `torch.ops.aten._weight_int4pack_mm_for_cpu` (PyTorch's "tinygemm" CPU kernel), which stores
  (s, m + 8 s) because it dequantises as (q - 8) * s + zero. Re-quantising a Q4_1 GGUF with group 32
  recovers its 4-bit weights, since Q4_1 blocks attain q = 0 and 15 at their min and max.
Activations run in `compute_dtype` (bfloat16 by default); the rest of the model (embeddings, norms)
is cast to it too. Decoding reads 2x (int8) / ~3.5x (int4) fewer weight bytes than bfloat16 per token.
"""
from __future__ import annotations

import torch
from torch import nn

INT4_GROUPS = (32, 64, 128, 256)  # group sizes the tinygemm kernel supports


# Scales are rounded to the compute dtype *before* the codes are chosen, so that the codes are the
# nearest ones for the scales the kernel will actually use (bfloat16 scales are off by up to 0.4%,
# which at code 127 would otherwise add half a step of error).
def _int8(w: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.float()
    scale = (w.abs().amax(1) / 127).clamp(min=1e-12).to(dtype)
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def _int4(w: torch.Tensor, group: int, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [N, K] int32 in 0..15; scale and zero [N, K / group] with w = (q - 8) * scale + zero."""
    N, K = w.shape
    g = w.float().reshape(N, K // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12).to(dtype)
    zero = (lo + 8 * scale.float()).to(dtype)
    q = torch.round((g - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp(0, 15)
    return q.to(torch.int32).reshape(N, K), scale, zero


def _pad_input(x: torch.Tensor, k_pad: int) -> torch.Tensor:
    return nn.functional.pad(x, (0, k_pad)) if k_pad else x


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype=torch.bfloat16):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        K = self.in_features
        # the kernel reads K in blocks of 16 and crashes on a ragged tail: zero columns, matched by zero x
        self.k_pad = -K % 16
        q, scale = _int8(nn.functional.pad(weight.detach().float(), (0, self.k_pad)), compute_dtype)
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().to(compute_dtype))
        self.compute_dtype = compute_dtype

    def dequantize(self) -> torch.Tensor:
        return self.qweight[:, :self.in_features].float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = _pad_input(x.reshape(-1, shape[-1]).to(self.compute_dtype), self.k_pad)
        y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per-channel"


class Int4Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int = 32,
                 compute_dtype=torch.bfloat16):
        super().__init__()
        self.out_features, self.in_features = N, K = weight.shape
        # the kernel packs output channels in blocks of 16 (zero rows, sliced off the output) and needs
        # whole groups along K (zero columns, matched by zero-padding x: rare shapes only)
        self.k_pad = -K % 32 if K % 32 else 0
        group = choose_group(K + self.k_pad, group_size)
        w = nn.functional.pad(weight.detach().float(), (0, self.k_pad, 0, -N % 16))
        q, scale, zero = _int4(w, group, compute_dtype)
        sz = torch.stack([scale.t(), zero.t()], -1).contiguous()  # tinygemm layout [K / group, N, 2]
        self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        self.register_buffer("scales_zeros", sz)
        self.register_buffer("bias", None if bias is None else bias.detach().to(compute_dtype))
        self.group_size, self.compute_dtype = group, compute_dtype

    def dequantize(self) -> torch.Tensor:
        eye = torch.eye(self.in_features + self.k_pad, dtype=self.compute_dtype)
        w = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.qweight, self.group_size, self.scales_zeros)
        return w[:self.in_features, :self.out_features].t().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = _pad_input(x.reshape(-1, shape[-1]).to(self.compute_dtype), self.k_pad)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, self.group_size, self.scales_zeros)
        if y.shape[-1] != self.out_features:
            y = y[:, :self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int4 group={self.group_size}"


def choose_group(in_features: int, group_size: int) -> int:
    """The requested group size, or the largest supported one below it that divides in_features."""
    if group_size not in INT4_GROUPS:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUPS}, got {group_size}")
    for g in sorted((g for g in INT4_GROUPS if g <= group_size), reverse=True):
        if in_features % g == 0:
            return g
    raise ValueError(f"in_features={in_features} is not a multiple of any int4 group size <= {group_size}; "
                     "use int8 for this model")


def _quantized(linear_w: torch.Tensor, bias, mode: str, group_size: int, dtype) -> nn.Module:
    if mode == "int8":
        return Int8Linear(linear_w, bias, dtype)
    return Int4Linear(linear_w, bias, group_size, dtype)


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str = "int8", group_size: int = 32, compute_dtype=torch.bfloat16,
                   skip: tuple[str, ...] = ()) -> nn.Module:
    """Replace the model's nn.Linear layers (in place) by int8 / int4 weight-only modules; returns the model.

    A tied embedding keeps its float table for the input lookup and gets a quantised `lm_head` for the
    output projection (the largest matmul of a small model: 49152 x 576 in SmolLM2-135M).
    `skip`: name fragments of layers to leave in float (e.g. ("router",) for MoE routers).
    """
    if mode not in ("int8", "int4"):
        raise ValueError(f"unknown quantisation {mode!r}; choose int8 or int4")
    if not hasattr(torch.ops.aten, "_weight_int8pack_mm" if mode == "int8" else "_weight_int4pack_mm_for_cpu"):
        raise RuntimeError(f"this torch ({torch.__version__}) lacks the CPU {mode} matmul kernel; use torch >= 2.6")
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("quantize_model targets CPU decoding; move the model to the CPU first")
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and not any(s in n for s in skip)]
    for name, lin in targets:
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], _quantized(lin.weight, lin.bias, mode, group_size, compute_dtype))
    if getattr(model, "lm_head", "absent") is None and hasattr(model, "embed"):
        model.lm_head = _quantized(model.embed.weight, None, mode, group_size, compute_dtype)
    model.to(compute_dtype)  # embeddings, norms, position tables; quantised buffers keep their integer dtypes
    model.quantization = {"mode": mode, "group_size": group_size if mode == "int4" else None,
                          "compute_dtype": str(compute_dtype).replace("torch.", "")}
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers, i.e. roughly what one decode step streams from memory."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
