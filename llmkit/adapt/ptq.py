"""Post-training quantisation with calibration data (survey §5.4.2 / §9.5): GPTQ, SmoothQuant, LLM.int8().

Implements:
- `gptq_weight`: GPTQ [Frantar et al. 2023] for one Linear: H = 2/n X^T X (+1% mean-diagonal damping), the
  upper Cholesky factor of H^-1, columns quantised in order with the error propagated to the not-yet-quantised
  columns, lazy batch updates in blocks of 128 (the reference implementation's scheme); group-wise scales
  chosen when a group starts; `gptq_model` runs it block by block on the inputs of the already-quantised layers;
- `act_absmax` + `smooth_model`: SmoothQuant [Xiao et al. 2023] s_j = max|X_j|^a / max|W_j|^(1-a), folded
  into the preceding RMSNorm/LayerNorm weights and the following Linears' input columns (exact in float);
  `w8a8_model` simulates int8 weights and per-token int8 activations to measure what smoothing buys;
- `int8_decomposed_matmul` / `Int8Linear`: LLM.int8() [Dettmers et al. 2022] vector-wise int8 (row-wise
  activation and output-channel weight absmax) with the outlier feature columns (|x| > 6, the paper's
  threshold) multiplied in floating point.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quantize import FakeQuantLinear, QuantLinear, linear_names, qrange, quant_params, replace_module


# ---------------------------------------------------------------------------------------------- GPTQ
def hessian_hook(store: dict, name: str):
    """Forward pre-hook accumulating H = 2/n sum x x^T of a Linear's inputs (running form of the reference)."""
    def hook(mod, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        n_new = x.shape[0]
        H, n = store.get(name, (torch.zeros(x.shape[1], x.shape[1], device=x.device), 0))
        H = H * (n / (n + n_new))
        x = x * (2.0 / (n + n_new)) ** 0.5
        store[name] = (H + x.t() @ x, n + n_new)
    return hook


@torch.no_grad()
def gptq_weight(W: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int | None = None, symmetric: bool = False,
                block: int = 128, percdamp: float = 0.01):
    """-> (codes [out, in], scales [out, groups], zeros [out, groups]) of W [out, in] given H [in, in]."""
    W = W.clone().float()
    H = H.clone().float()
    rows, cols = W.shape
    g = group_size or cols
    if cols % g:
        raise ValueError(f"in_features={cols} is not divisible by group_size={g}")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, device=H.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    lo, hi = qrange(bits, symmetric)
    Q = torch.zeros_like(W)
    scales = torch.zeros(rows, cols // g, device=W.device)
    zeros = torch.zeros_like(scales)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(rows, i2 - i1, device=W.device), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:  # a new group: its scale from the current (error-updated) weights
                grp = torch.cat([W1[:, i:], W[:, i2:]], 1)[:, :g]
                s, z = quant_params(grp.unsqueeze(1), bits, symmetric)
                scales[:, col // g], zeros[:, col // g] = s.view(-1), z.view(-1)
            s, z = scales[:, col // g], zeros[:, col // g]
            w = W1[:, i]
            q = torch.clamp(torch.round(w / s) + z, lo, hi)
            Q[:, col] = q
            err = (w - (q - z) * s) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    dtype = torch.int8 if symmetric else torch.uint8
    return Q.to(dtype), scales, zeros


@torch.no_grad()
def gptq_linear(lin: nn.Linear, H: torch.Tensor, bits: int = 4, group_size: int | None = None,
                symmetric: bool = False) -> QuantLinear:
    q, s, z = gptq_weight(lin.weight.data, H, bits, group_size, symmetric)
    if group_size is None:
        s, z = s.view(-1, 1), z.view(-1, 1)
    return QuantLinear(q, s, z, lin.bias, bits, group_size, symmetric)


@torch.no_grad()
def gptq_model(model: nn.Module, calib: list[torch.Tensor], bits: int = 4, group_size: int | None = None,
               symmetric: bool = False, skip=("lm_head",)) -> nn.Module:
    """Quantise every Linear of every block with GPTQ, block by block, each on inputs that already pass through
    the quantised blocks before it (calib: list of input_ids batches)."""
    names = linear_names(model, skip)
    blocks = sorted({".".join(n.split(".")[:2]) for n in names if n.startswith("layers.")}, key=lambda b: int(b.split(".")[1]))
    groups = [[n for n in names if n.startswith(b + ".")] for b in blocks]
    groups.append([n for n in names if not n.startswith("layers.")])
    for group in groups:
        if not group:
            continue
        store: dict = {}
        handles = [model.get_submodule(n).register_forward_pre_hook(hessian_hook(store, n)) for n in group]
        for ids in calib:
            model(ids)
        for h in handles:
            h.remove()
        for n in group:
            replace_module(model, n, gptq_linear(model.get_submodule(n), store[n][0], bits, group_size, symmetric))
    return model


# ---------------------------------------------------------------------------------------------- SmoothQuant
@torch.no_grad()
def act_absmax(model: nn.Module, calib: list[torch.Tensor], names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| of every Linear's input over the calibration batches."""
    names = names or linear_names(model)
    out: dict[str, torch.Tensor] = {}

    def make(n):
        def hook(mod, args):
            m = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
            out[n] = torch.maximum(out[n], m) if n in out else m
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(make(n)) for n in names]
    for ids in calib:
        model(ids)
    for h in handles:
        h.remove()
    return out


def smooth_pairs(model: nn.Module) -> list[tuple[str, list[str]]]:
    """(norm, Linears it feeds) in each pre-norm block: attn_norm -> q,k,v; mlp_norm -> gate,up (or up)."""
    cfg = model.cfg
    if cfg.norm_position != "pre" or cfg.parallel_block or cfg.norm_offset or cfg.n_experts:
        raise ValueError("SmoothQuant folds scales into pre-norm weights: needs norm_position=pre, no parallel "
                         "block, no Gemma (1+w) offset and a dense FFN")
    pairs = []
    for i in range(cfg.n_layers):
        p = f"layers.{i}"
        pairs.append((f"{p}.attn_norm", [f"{p}.attn.q", f"{p}.attn.k", f"{p}.attn.v"]))
        mlp = [f"{p}.mlp.gate", f"{p}.mlp.up"] if cfg.is_glu else [f"{p}.mlp.up"]
        pairs.append((f"{p}.mlp_norm", mlp))
    return pairs


@torch.no_grad()
def smooth_model(model: nn.Module, absmax: dict[str, torch.Tensor], alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """Migrate activation outliers into the weights (in place); returns the scales s per norm."""
    scales = {}
    for norm_name, lins in smooth_pairs(model):
        norm = model.get_submodule(norm_name)
        mods = [model.get_submodule(n) for n in lins]
        w_max = torch.cat([m.weight.abs() for m in mods], 0).amax(0).clamp(min=1e-5)
        s = (absmax[lins[0]].clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)
        norm.weight.div_(s.to(norm.weight.dtype))
        if getattr(norm, "bias", None) is not None:
            norm.bias.div_(s.to(norm.bias.dtype))
        for m in mods:
            m.weight.mul_(s.to(m.weight.dtype))
        scales[norm_name] = s
    return scales


def w8a8_model(model: nn.Module, skip=("lm_head",)) -> nn.Module:
    """Simulated W8A8: int8 per-channel weights and per-token int8 activations on every Linear (in place)."""
    for name in linear_names(model, skip):
        replace_module(model, name, FakeQuantLinear(model.get_submodule(name), w_bits=8, a_bits=8))
    return model


# ---------------------------------------------------------------------------------------------- LLM.int8()
def int8_decomposed_matmul(x: torch.Tensor, W: torch.Tensor, bias=None, threshold: float = 6.0) -> torch.Tensor:
    """x @ W^T with outlier input features (any |x| > threshold) in float and the rest in vector-wise int8."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).float()
    outlier = (x2.abs() > threshold).any(0)
    y = x2[:, outlier] @ W.float()[:, outlier].t()
    xr, wr = x2[:, ~outlier], W.float()[:, ~outlier]
    if xr.shape[1]:
        sx = (xr.abs().amax(1, keepdim=True) / 127).clamp(min=1e-12)
        sw = (wr.abs().amax(1, keepdim=True) / 127).clamp(min=1e-12)
        qx, qw = torch.round(xr / sx), torch.round(wr / sw)
        y = y + (qx.double() @ qw.double().t()).float() * sx * sw.t()  # integer products, exact in float64
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*shape[:-1], W.shape[0]).to(x.dtype)


class Int8Linear(nn.Module):
    """LLM.int8() Linear: int8 weights (row-wise absmax); outlier columns use the dequantised weight in float."""

    def __init__(self, lin: nn.Linear, threshold: float = 6.0):
        super().__init__()
        self.in_features, self.out_features, self.threshold = lin.in_features, lin.out_features, threshold
        w = lin.weight.data.float()
        scale = (w.abs().amax(1, keepdim=True) / 127).clamp(min=1e-12)
        self.register_buffer("qweight", torch.round(w / scale).to(torch.int8))
        self.register_buffer("scales", scale)
        self.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False) if lin.bias is not None else None

    @property
    def weight(self) -> torch.Tensor:
        return self.qweight.float() * self.scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_decomposed_matmul(x, self.weight, self.bias, self.threshold)


def int8_model(model: nn.Module, threshold: float = 6.0, skip=("lm_head",)) -> nn.Module:
    for name in linear_names(model, skip):
        replace_module(model, name, Int8Linear(model.get_submodule(name), threshold))
    return model


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.mse_loss(a.float(), b.float()).item()
