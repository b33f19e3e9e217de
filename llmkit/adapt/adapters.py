"""Parameter-efficient tuning besides LoRA (survey §5.3.1): bottleneck adapters, prefix tuning, prompt tuning.

Implements:
- `BottleneckAdapter` + `add_adapters`: h + up(act(down(h))) after the attention and FFN sub-layers (serial, Houlsby
  et al. 2019) or beside them (parallel, He et al. 2022); up-projection zero-initialised so the model starts
  equal to the base; 2*d*r (+ r + d biases) parameters per adapter;
- `PrefixTuning`: trainable key/value vectors prepended in every attention layer [Li & Liang 2021], written into
  the model's own KV cache so no attention code changes; an MLP re-parameterisation for training that
  `freeze_reparam()` drops, keeping only the prefix it produced;
- `PromptTuning`: trainable virtual-token embeddings prepended at the input only [Lester et al. 2021]; with
  `encoder="mlp"` the prompt is produced by a small prompt encoder (P-tuning [Liu et al. 2021]).
The base model is frozen by each wrapper; only the new parameters train.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BottleneckAdapter(nn.Module):
    def __init__(self, d: int, r: int, act=F.relu):
        super().__init__()
        self.down, self.up, self.act = nn.Linear(d, r), nn.Linear(r, d), act
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(h)))


class Adapted(nn.Module):
    """A sub-layer followed (serial) or accompanied (parallel) by a bottleneck adapter."""

    def __init__(self, module: nn.Module, adapter: BottleneckAdapter, parallel: bool = False):
        super().__init__()
        self.module, self.adapter, self.parallel = module, adapter, parallel

    def forward(self, x, *args, **kwargs):
        y = self.module(x, *args, **kwargs)
        return y + self.adapter(x if self.parallel else y)


def add_adapters(model: nn.Module, r: int = 16, where=("attn", "mlp"), parallel: bool = False) -> list[str]:
    for p in model.parameters():
        p.requires_grad_(False)
    names = []
    for i, blk in enumerate(model.layers):
        for w in where:
            setattr(blk, w, Adapted(getattr(blk, w), BottleneckAdapter(model.cfg.d_model, r), parallel))
            names.append(f"layers.{i}.{w}")
    return names


class PrefixTuning(nn.Module):
    def __init__(self, model: nn.Module, n_prefix: int = 8, reparam_hidden: int | None = 64):
        super().__init__()
        cfg = model.cfg
        self.model, self.n = model, n_prefix
        for p in model.parameters():
            p.requires_grad_(False)
        self.shape = (cfg.n_layers, 2, cfg.n_kv_heads, n_prefix, cfg.head_dim)
        numel = cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim
        if reparam_hidden:  # Li & Liang: optimise P = MLP(P') for stability, keep only P afterwards
            self.embed = nn.Parameter(torch.randn(n_prefix, cfg.d_model) * 0.02)
            self.mlp = nn.Sequential(nn.Linear(cfg.d_model, reparam_hidden), nn.Tanh(), nn.Linear(reparam_hidden, numel))
            self.prefix = None
        else:
            self.prefix = nn.Parameter(torch.randn(self.shape) * 0.02)
            self.mlp = None

    def kv(self) -> torch.Tensor:
        """[layers, 2, n_kv, P, head_dim]"""
        if self.prefix is not None:
            return self.prefix
        flat = self.mlp(self.embed)  # [P, layers*2*n_kv*hd]
        L, _, H, P, D = self.shape
        return flat.view(P, L, 2, H, D).permute(1, 2, 3, 0, 4)

    @torch.no_grad()
    def freeze_reparam(self) -> None:
        if self.mlp is not None:
            self.prefix = nn.Parameter(self.kv().detach().clone())
            self.mlp, self.embed = None, None

    @property
    def cfg(self):
        return self.model.cfg

    def forward(self, input_ids: torch.Tensor, positions=None, attn_mask=None, **kw) -> torch.Tensor:
        B, T = input_ids.shape
        kv = self.kv().to(self.model.dtype)
        cache = self.model.new_cache(B, self.n + T)
        for layer in range(self.shape[0]):
            cache.k[layer][:, :, : self.n] = kv[layer, 0].expand(B, -1, -1, -1)
            cache.v[layer][:, :, : self.n] = kv[layer, 1].expand(B, -1, -1, -1)
        cache.length = self.n
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        if attn_mask is not None:
            attn_mask = torch.cat([torch.ones(B, self.n, dtype=torch.bool, device=attn_mask.device), attn_mask.bool()], 1)
        return self.model(input_ids, positions=positions, attn_mask=attn_mask, cache=cache, **kw)


class PromptTuning(nn.Module):
    def __init__(self, model: nn.Module, n_virtual: int = 8, init_ids: list[int] | None = None, encoder: str | None = None):
        super().__init__()
        self.model, self.n = model, n_virtual
        for p in model.parameters():
            p.requires_grad_(False)
        d = model.cfg.d_model
        if init_ids is not None:  # initialise from real token embeddings (Lester et al.'s best init)
            init = model.embed.weight[torch.tensor(init_ids[:n_virtual])].detach().clone()
        else:
            init = torch.randn(n_virtual, d) * model.embed.weight.std().item()
        self.prompt = nn.Parameter(init)
        self.encoder = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d)) if encoder == "mlp" else None
        self._active = False
        model.embed.register_forward_hook(self._inject)

    @property
    def cfg(self):
        return self.model.cfg

    def virtual(self) -> torch.Tensor:
        return self.prompt if self.encoder is None else self.prompt + self.encoder(self.prompt)

    def _inject(self, module, args, out):
        if not self._active:
            return out
        v = self.virtual().to(out.dtype)
        return torch.cat([v.expand(out.shape[0], -1, -1), out[:, self.n:]], 1)

    def forward(self, input_ids: torch.Tensor, attn_mask=None, positions=None, **kw) -> torch.Tensor:
        B = input_ids.shape[0]
        ids = torch.cat([input_ids.new_zeros(B, self.n), input_ids], 1)  # placeholders the hook overwrites
        if attn_mask is not None:
            attn_mask = torch.cat([torch.ones(B, self.n, dtype=torch.bool, device=ids.device), attn_mask.bool()], 1)
        if positions is not None:
            positions = torch.cat([torch.arange(self.n, device=ids.device).expand(B, -1), positions + self.n], 1)
        self._active = True
        try:
            out = self.model(ids, attn_mask=attn_mask, positions=positions, **kw)
        finally:
            self._active = False
        return out[:, self.n:]
