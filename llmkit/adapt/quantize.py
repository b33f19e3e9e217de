"""Quantisation basics, weight-only formats, NF4 and QAT (survey §5.4 / §9.5).

Implements:
- `quantize_tensor` / `dequantize`: x_q = clamp(round(x / S) + Z) per output channel or per group of
  `group_size` input columns, symmetric (Z = 0) or asymmetric; round-trip error <= S/2 inside the range;
- `pack_int4` / `unpack_int4`: two 4-bit codes per byte (the storage of int4 weights);
- `QuantLinear`: a Linear holding int8 / packed-int4 codes + scales (+ zeros), dequantised on the fly;
  `rtn_linear` / `quantize_model`: round-to-nearest PTQ of every Linear (the baseline GPTQ beats);
- NF4 [QLoRA, Dettmers et al. 2023]: `nf4_levels` (quantiles of N(0,1) normalised to [-1, 1], 8 positive /
  7 negative + an exact zero), block-wise absmax quantisation with optional double quantisation of the
  absmax constants (8-bit, blocks of 256), `NF4Linear` (frozen base for LoRA);
- QAT: `fake_quant` with a straight-through estimator (forward quantised, backward identity), `FakeQuantLinear`
  (weights and optionally per-token activations), `prepare_qat` / `convert_qat`, and `DistillObjective`
  (KL to the full-precision teacher on its own generated text, LLM-QAT's data-free recipe).
GPTQ, SmoothQuant and LLM.int8() live in `ptq.py`.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------------------------------------- basics
def _grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    out_f, in_f = w.shape
    g = group_size or in_f
    if in_f % g:
        raise ValueError(f"in_features={in_f} is not divisible by group_size={g}; pick a divisor (e.g. 32, 64, 128)")
    return w.reshape(out_f, in_f // g, g)


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)


def quant_params(wg: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero per row of the last axis: absmax/qmax (symmetric) or (max-min)/(2^b-1) with zero point."""
    lo, hi = qrange(bits, symmetric)
    if symmetric:
        scale = wg.abs().amax(-1, keepdim=True) / hi
        zero = torch.zeros_like(scale)
    else:
        mn = wg.amin(-1, keepdim=True).clamp(max=0)
        mx = wg.amax(-1, keepdim=True).clamp(min=0)
        scale = (mx - mn) / hi
        zero = torch.round(-mn / scale.clamp(min=1e-12))
    return scale.clamp(min=1e-12), zero


def quantize_tensor(w: torch.Tensor, bits: int = 8, group_size: int | None = None, symmetric: bool = True):
    """w [out, in] -> (codes int8/uint8 [out, in], scale [out, in/g], zero [out, in/g])."""
    wg = _grouped(w.float(), group_size)
    scale, zero = quant_params(wg, bits, symmetric)
    lo, hi = qrange(bits, symmetric)
    q = torch.clamp(torch.round(wg / scale) + zero, lo, hi)
    dtype = torch.int8 if symmetric else torch.uint8
    return q.reshape(w.shape).to(dtype), scale.squeeze(-1), zero.squeeze(-1)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    qg = _grouped(q.float(), group_size)
    return ((qg - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(q.shape)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes in [-8, 7] or [0, 15], shape [..., 2n] -> uint8 [..., n] (low nibble first)."""
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor, signed: bool = True) -> torch.Tensor:
    lo, hi = (p & 0xF).to(torch.int16), (p >> 4).to(torch.int16)
    out = torch.stack([lo, hi], -1).reshape(*p.shape[:-1], p.shape[-1] * 2)
    return torch.where(out > 7, out - 16, out).to(torch.int8) if signed else out.to(torch.uint8)


class QuantLinear(nn.Module):
    """Weight-only quantised Linear: int8 codes or packed int4, scales (and zeros) per channel or group."""

    def __init__(self, q: torch.Tensor, scale, zero, bias=None, bits: int = 8, group_size: int | None = None,
                 symmetric: bool = True):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.register_buffer("qweight", pack_int4(q) if bits == 4 else q)
        self.register_buffer("scales", scale.float())
        self.register_buffer("zeros", zero.float())
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    def codes(self) -> torch.Tensor:
        return unpack_int4(self.qweight, self.symmetric) if self.bits == 4 else self.qweight

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes(), self.scales, self.zeros, self.group_size)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def rtn_linear(lin: nn.Linear, bits: int = 8, group_size: int | None = None, symmetric: bool = True) -> QuantLinear:
    q, s, z = quantize_tensor(lin.weight.data, bits, group_size, symmetric)
    return QuantLinear(q, s, z, lin.bias, bits, group_size, symmetric)


def linear_names(model: nn.Module, skip=("lm_head",)) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] not in skip]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def quantize_model(model: nn.Module, bits: int = 8, group_size: int | None = None, symmetric: bool = True,
                   skip=("lm_head",)) -> nn.Module:
    """Round-to-nearest weight-only quantisation of every Linear except `skip` (in place)."""
    for name in linear_names(model, skip):
        replace_module(model, name, rtn_linear(model.get_submodule(name), bits, group_size, symmetric))
    return model


# ---------------------------------------------------------------------------------------------- NF4 (QLoRA)
@functools.lru_cache(maxsize=4)
def _nf4_levels(offset: float) -> torch.Tensor:
    normal = torch.distributions.Normal(0.0, 1.0)
    pos = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (v / v.abs().max()).float()


def nf4_levels(offset: float = 0.9677083) -> torch.Tensor:
    """The 16 NF4 values: N(0,1) quantiles at linspace(offset, 0.5, 9) (8 positive) and linspace(offset, 0.5, 8)
    (7 negative), plus 0, each side divided by its max; `offset` is bitsandbytes' create_normal_map default."""
    return _nf4_levels(offset).clone()


def nf4_quantize(w: torch.Tensor, block: int = 64, double_quant: bool = True) -> dict:
    """Block-wise absmax NF4; with double quantisation the fp32 absmax are themselves stored as int8
    (blocks of 256, minus their mean) [QLoRA §3]."""
    flat = w.float().reshape(-1, block)
    absmax = flat.abs().amax(-1).clamp(min=1e-12)
    codes = (flat / absmax[:, None]).unsqueeze(-1).sub(nf4_levels()).abs().argmin(-1).to(torch.uint8)
    out = {"codes": pack_int4(codes, ), "shape": tuple(w.shape), "block": block}
    if double_quant:
        pad = (-absmax.numel()) % 256
        a = torch.cat([absmax, absmax.new_zeros(pad)]) if pad else absmax
        mean = a[: absmax.numel()].mean()
        q, s, _ = quantize_tensor((a - mean).reshape(-1, 256), 8, None, True)
        out.update(absmax_q=q, absmax_scale=s, absmax_mean=mean, n_blocks=absmax.numel())
    else:
        out["absmax"] = absmax
    return out


def nf4_dequantize(p: dict) -> torch.Tensor:
    if "absmax" in p:
        absmax = p["absmax"]
    else:
        absmax = (dequantize(p["absmax_q"], p["absmax_scale"], torch.zeros_like(p["absmax_scale"])).reshape(-1)
                  [: p["n_blocks"]] + p["absmax_mean"])
    codes = unpack_int4(p["codes"], signed=False).long()
    return (_nf4_levels(0.9677083).to(absmax.device)[codes] * absmax[:, None]).reshape(p["shape"])


class NF4Linear(nn.Module):
    """A frozen NF4 base Linear (QLoRA); dequantised to the compute dtype at every forward."""

    def __init__(self, lin: nn.Linear, block: int = 64, double_quant: bool = True):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.packed = nf4_quantize(lin.weight.data, block, double_quant)
        for k, v in self.packed.items():
            if torch.is_tensor(v):
                self.register_buffer(f"nf4_{k}", v)
        self.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False) if lin.bias is not None else None

    def dequantize(self) -> torch.Tensor:
        p = {k: getattr(self, f"nf4_{k}") if torch.is_tensor(v) else v for k, v in self.packed.items()}
        return nf4_dequantize(p)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


@torch.no_grad()
def nf4_model(model: nn.Module, targets=None, block: int = 64, double_quant: bool = True, skip=("lm_head",)) -> nn.Module:
    """Replace Linears (all but `skip`, or only `targets` by short name) by NF4Linear bases, in place."""
    for name in linear_names(model, skip):
        if targets is None or name.split(".")[-1] in targets:
            replace_module(model, name, NF4Linear(model.get_submodule(name), block, double_quant))
    return model


# ---------------------------------------------------------------------------------------------- QAT
def fake_quant(x: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = True,
               per_token: bool = False) -> torch.Tensor:
    """Quantise-dequantise in the forward, identity in the backward (straight-through estimator [Bengio 2013])."""
    if per_token:  # activations: one scale per token over the last axis
        flat = x.reshape(-1, x.shape[-1])
        scale, zero = quant_params(flat.unsqueeze(1), bits, symmetric)
        lo, hi = qrange(bits, symmetric)
        q = torch.clamp(torch.round(flat.unsqueeze(1) / scale) + zero, lo, hi)
        dq = ((q - zero) * scale).reshape(x.shape)
    else:
        q, s, z = quantize_tensor(x.detach(), bits, group_size, symmetric)
        dq = dequantize(q, s, z, group_size).to(x.dtype)
    return x + (dq - x).detach()


class FakeQuantLinear(nn.Module):
    def __init__(self, lin: nn.Linear, w_bits: int = 4, group_size: int | None = None, a_bits: int | None = None):
        super().__init__()
        self.lin, self.w_bits, self.group_size, self.a_bits = lin, w_bits, group_size, a_bits
        self.in_features, self.out_features = lin.in_features, lin.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.lin.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_bits:
            x = fake_quant(x, self.a_bits, per_token=True)
        return F.linear(x, fake_quant(self.lin.weight, self.w_bits, self.group_size), self.lin.bias)


def prepare_qat(model: nn.Module, w_bits: int = 4, group_size: int | None = None, a_bits: int | None = None,
                skip=("lm_head",)) -> nn.Module:
    for name in linear_names(model, skip):
        replace_module(model, name, FakeQuantLinear(model.get_submodule(name), w_bits, group_size, a_bits))
    return model


@torch.no_grad()
def convert_qat(model: nn.Module) -> nn.Module:
    """Fake-quant layers -> real QuantLinear with the weights QAT learned."""
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]:
        replace_module(model, name, rtn_linear(m.lin, m.w_bits, m.group_size))
    return model


class DistillObjective:
    """loss_fn: KL(teacher || student) per token at temperature T, on batches with input_ids (+labels for the mask)."""

    def __init__(self, teacher: nn.Module, temperature: float = 1.0):
        self.teacher, self.T = teacher.eval().requires_grad_(False), temperature

    def __call__(self, model, batch):
        with torch.no_grad():
            t = F.log_softmax(self.teacher(batch["input_ids"]).float() / self.T, -1)
        s = F.log_softmax(model(batch["input_ids"]).float() / self.T, -1)
        kl = (t.exp() * (t - s)).sum(-1)
        mask = (batch["labels"] != -100).float() if "labels" in batch else torch.ones_like(kl)
        loss = (kl * mask).sum() / mask.sum().clamp(min=1) * self.T ** 2
        return loss, {"kl": loss.item()}
