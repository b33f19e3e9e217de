"""LoRA and QLoRA (survey §5.3.1-5.3.2, §5.4.2), saved in the PEFT format that `peft` loads.

Implements:
- `LoRALinear`: y = W0 x + (alpha/r) * B A dropout(x), A Kaiming-uniform and B = 0 so the wrapped model starts
  equal to the base [Hu et al. 2021]; `merge` / `unmerge` fold BA into W0 and back; rsLoRA scaling alpha/sqrt(r);
- `apply_lora(model, r, alpha, dropout, targets)`: wraps the named Linear layers and freezes everything else;
  the base may be an NF4 `QuantLinear` from `quantize.py` (QLoRA [Dettmers et al. 2023]);
- `lora_disabled(model)`: context in which every adapter is bypassed (the DPO/PPO reference policy for free);
- `save_adapter` / `load_adapter`: `adapter_config.json` + `adapter_model.safetensors` with the key names
  `peft` writes for the Hugging Face export of the same model, so `PeftModel.from_pretrained(hf_model, dir)`
  loads what we train and we load what `peft` trains;
- `merge_lora(model)`: replaces every wrapper by a plain Linear holding W0 + scaling * BA.
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# llmkit module name -> Hugging Face Llama-family module name (the key layout of the HF export)
HF_SUFFIX = {"attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
             "attn.o": "self_attn.o_proj", "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj", "mlp.down": "mlp.down_proj"}
HF_SHORT = {k.split(".")[-1]: v.split(".")[-1] for k, v in HF_SUFFIX.items()}  # "q" -> "q_proj"
ALL_LINEAR = ("q", "k", "v", "o", "gate", "up", "down")


def hf_module_name(name: str) -> str:
    """'layers.3.attn.q' -> 'model.layers.3.self_attn.q_proj' (lm_head stays lm_head)."""
    if name == "lm_head":
        return name
    parts = name.split(".")
    if parts[0] != "layers" or ".".join(parts[2:]) not in HF_SUFFIX:
        raise ValueError(f"no Hugging Face name for module {name!r}; LoRA targets must be attention/MLP Linears or lm_head")
    return f"model.layers.{parts[1]}.{HF_SUFFIX['.'.join(parts[2:])]}"


def llmkit_module_name(hf_name: str) -> str:
    inverse = {v: k for k, v in HF_SUFFIX.items()}
    if hf_name == "lm_head":
        return hf_name
    parts = hf_name.split(".")
    if parts[:2] != ["model", "layers"] or ".".join(parts[3:]) not in inverse:
        raise ValueError(f"cannot map Hugging Face module {hf_name!r} to llmkit")
    return f"layers.{parts[2]}.{inverse['.'.join(parts[3:])]}"


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got r={r}")
        self.base, self.r, self.alpha = base, r, alpha
        self.in_features, self.out_features = base.in_features, base.out_features
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.rslora = rslora
        dev = next(base.parameters()).device if any(True for _ in base.parameters()) else None
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=dev)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=dev)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # peft's default (= nn.Linear's init)
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged, self.disabled = False, False

    @property
    def weight(self) -> torch.Tensor:  # so code reading `.weight` (e.g. tied heads) still works
        return self.base.weight

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged or self.disabled:
            return y
        a = self.lora_A.weight.to(x.dtype)
        b = self.lora_B.weight.to(x.dtype)
        return y + F.linear(F.linear(self.dropout(x), a), b) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self._base_weight().add_(self.delta_weight().to(self._base_weight().dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self._base_weight().sub_(self.delta_weight().to(self._base_weight().dtype))
            self.merged = False

    def _base_weight(self) -> torch.Tensor:
        if not isinstance(self.base, nn.Linear):
            raise TypeError("cannot merge LoRA into a quantised base in place; use merge_lora(model), which dequantises")
        return self.base.weight


def _targets(model: nn.Module, targets) -> list[str]:
    targets = ALL_LINEAR if targets in ("all", "all-linear", None) else tuple(targets)
    names = [n for n, m in model.named_modules()
             if not isinstance(m, LoRALinear) and hasattr(m, "in_features") and n.split(".")[-1] in targets
             and ".lora_" not in n and not n.endswith(".base")]
    if not names:
        raise ValueError(f"no Linear layer of the model matches LoRA targets {targets}; use names such as {ALL_LINEAR}")
    return names


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0, targets=("q", "v"),
               rslora: bool = False, freeze_base: bool = True) -> list[str]:
    """Wrap the target Linear layers in LoRALinear (in place); returns the wrapped module names."""
    names = _targets(model, targets)
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    for name in names:
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        setattr(holder, child, LoRALinear(getattr(holder, child), r, alpha, dropout, rslora))
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """Bypass every adapter (the frozen base acts as the reference policy without a second copy)."""
    mods = list(lora_modules(model).values())
    if any(m.merged for m in mods):
        raise RuntimeError("adapters are merged; unmerge them before using the base as a reference")
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m in mods:
            m.disabled = False


def set_merged(model: nn.Module, merged: bool) -> None:
    for m in lora_modules(model).values():
        m.merge() if merged else m.unmerge()


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Replace each LoRALinear by a plain Linear holding W0 + scaling*BA (dequantising a QLoRA base)."""
    for name, m in list(lora_modules(model).items()):
        base = m.base
        w = base.weight if isinstance(base, nn.Linear) else base.dequantize()
        lin = nn.Linear(m.in_features, m.out_features, bias=getattr(base, "bias", None) is not None,
                        device=w.device, dtype=w.dtype)
        lin.weight.copy_(w + (0 if m.merged else m.delta_weight().to(w.dtype)))
        if lin.bias is not None:
            lin.bias.copy_(base.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, lin)
    return model


# ---------------------------------------------------------------------------------------------- PEFT format
def adapter_config(model: nn.Module, base_model: str | None = None) -> dict:
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA layers; call apply_lora first")
    first = next(iter(mods.values()))
    short = sorted({HF_SHORT.get(n.split(".")[-1], n.split(".")[-1]) for n in mods})
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": first.r, "lora_alpha": first.alpha, "lora_dropout": getattr(first.dropout, "p", 0.0),
        "target_modules": short, "bias": "none", "fan_in_fan_out": False, "use_rslora": first.rslora,
        "init_lora_weights": True, "modules_to_save": None, "inference_mode": True,
    }


def save_adapter(model: nn.Module, out_dir: str | Path, base_model: str | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors with peft's key names for the HF export."""
    from safetensors.torch import save_file

    from ..artifacts import atomic_write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, m in lora_modules(model).items():
        prefix = f"base_model.model.{hf_module_name(name)}"
        tensors[f"{prefix}.lora_A.weight"] = m.lora_A.weight.detach().float().contiguous().cpu()
        tensors[f"{prefix}.lora_B.weight"] = m.lora_B.weight.detach().float().contiguous().cpu()
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    atomic_write_json(out / "adapter_config.json", adapter_config(model, base_model))
    return out


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Apply and fill LoRA layers from a PEFT adapter directory (ours or one `peft` saved)."""
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    cfg_path, w_path = d / "adapter_config.json", d / "adapter_model.safetensors"
    if not cfg_path.exists() or not w_path.exists():
        raise FileNotFoundError(f"{d} is not a PEFT adapter: it needs adapter_config.json and adapter_model.safetensors")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not supported; only LORA adapters load")
    if cfg.get("fan_in_fan_out"):
        raise ValueError(f"{cfg_path}: fan_in_fan_out adapters (GPT-2 Conv1D) are not supported")
    tensors = load_file(str(w_path))
    inverse = {v: k for k, v in HF_SHORT.items()}
    wanted = {}
    for key, t in tensors.items():
        stem = key.removeprefix("base_model.model.")
        for part in ("lora_A", "lora_B"):
            for suffix in (f".{part}.weight", f".{part}.default.weight"):
                if stem.endswith(suffix):
                    wanted.setdefault(llmkit_module_name(stem[: -len(suffix)]), {})[part] = t
    targets = sorted({inverse.get(t, t) for t in cfg["target_modules"]})
    apply_lora(model, cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0), targets, cfg.get("use_rslora", False))
    mods = lora_modules(model)
    missing = set(mods) - set(wanted)
    if missing:
        raise ValueError(f"{w_path} has no weights for {sorted(missing)[:3]}...; the adapter does not match this model")
    with torch.no_grad():
        for name, parts in wanted.items():
            mods[name].lora_A.weight.copy_(parts["lora_A"])
            mods[name].lora_B.weight.copy_(parts["lora_B"])
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total
