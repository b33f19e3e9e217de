"""Model configuration: one schema for every architecture of survey §4.2 (Table 3, Table 4).

Implements:
- `ModelConfig`, a dataclass whose fields are the architecture choices (data, not classes):
  causal / prefix decoder / encoder-decoder (§4.2.1), norm type and position (§4.2.2),
  position embeddings and RoPE scaling (§4.2.2, §4.2.5), activations, attention variants,
  biases, MoE, soft-capping, embedding scaling.
- validation with errors that say what to change;
- named presets (YAML files in `presets/`), e.g. `ModelConfig.preset("llama-tiny")`.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).parent / "presets"

ARCHS = ("decoder", "prefix_decoder", "encoder_decoder")
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post", "sandwich")
POSITIONS = ("learned", "sinusoidal", "rope", "alibi", "t5", "none")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu", "geglu_tanh", "reglu")
GLU_ACTIVATIONS = ("swiglu", "geglu", "geglu_tanh", "reglu")
ROPE_SCALINGS = ("linear", "ntk", "yarn", "llama3")


class ConfigError(ValueError):
    """A configuration that cannot be built; the message says which field to change."""


def check_choice(obj: Any, name: str, options: tuple, prefix: str = "") -> None:
    """Raise ConfigError naming the field and its valid values when obj.name is not one of them."""
    if getattr(obj, name) not in options:
        raise ConfigError(f"{prefix}{name}={getattr(obj, name)!r} is unknown; choose one of {list(options)}")


@dataclass
class ModelConfig:
    # ---- shape
    arch: str = "decoder"
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # None = n_heads (MHA); 1 = MQA; otherwise GQA
    head_dim: int | None = None  # None = d_model // n_heads
    d_ff: int | None = None  # None = 4*d_model, or 2/3 of that (rounded to 8) for GLU activations
    max_seq_len: int = 512
    n_encoder_layers: int | None = None  # encoder_decoder only; None = n_layers
    # ---- normalisation (§4.2.2, Table 4)
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    norm_offset: float = 0.0  # Gemma's RMSNorm scales by (1 + w): norm_offset=1.0
    norm_position: str = "pre"
    deepnorm: bool = False  # post-LN with x*alpha + f(x); alpha=(2N)^(1/4), init beta=(8N)^(-1/4) (DeepNet)
    qk_norm: bool = False
    final_norm: bool = True
    # ---- positions
    pos: str = "rope"
    rope_theta: float = 10000.0
    rope_local_theta: float | None = None  # per-layer bases: local (sliding) layers use this base (Gemma 3)
    rope_scaling: dict | None = None  # {"type": linear|ntk|yarn|llama3, "factor": f, ...}
    rope_fraction: float = 1.0  # rotate only this fraction of head_dim (GPT-NeoX / Phi style)
    t5_num_buckets: int = 32
    t5_max_distance: int = 128
    block_pos: bool = False  # GLM's 2D positions: a learned table of intra-span positions added to the embeddings
    # ---- feed-forward
    activation: str = "swiglu"
    # ---- attention
    sliding_window: int | None = None
    layer_types: list[str] | None = None  # per layer "global" | "local"; None = all global (or all local if window)
    attn_scale: float | None = None  # None = 1/sqrt(head_dim)
    attn_softcap: float | None = None  # Gemma 2: scores = c*tanh(scores/c)
    # ---- biases (Table 3 "Bias" column)
    qkv_bias: bool = False
    attn_out_bias: bool = False
    mlp_bias: bool = False
    norm_bias: bool = True  # LayerNorm only
    # ---- block and embeddings
    parallel_block: bool = False  # GPT-J / PaLM: x + attn(ln(x)) + mlp(ln(x))
    tie_embeddings: bool = False
    embed_scale: float | None = None  # Gemma: sqrt(d_model)
    embed_grad_scale: float = 1.0  # GLM-130B embedding-gradient shrink alpha
    logit_softcap: float | None = None  # Gemma 2 final logits
    dropout: float = 0.0
    # ---- mixture of experts (§4.2.1, Switch / GLaM / Mixtral)
    n_experts: int = 0
    moe_top_k: int = 2
    moe_capacity_factor: float | None = None  # None = no token dropping
    moe_aux_loss_coef: float = 0.01
    moe_every: int = 1  # MoE FFN on every k-th layer
    # ---- special tokens and provenance
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    decoder_start_token_id: int | None = None
    init_std: float = 0.02
    family: str = "llmkit"  # where the weights came from: llama, qwen2, gemma2, gpt2, ...
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ConfigError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set head_dim")
            self.head_dim = self.d_model // self.n_heads
        if self.d_ff is None:
            if self.activation in GLU_ACTIVATIONS:  # keep the parameter count of a 4d MLP [Shazeer 2020]
                self.d_ff = int(8 * self.d_model / 3 + 7) // 8 * 8
            else:
                self.d_ff = 4 * self.d_model
        if self.n_encoder_layers is None:
            self.n_encoder_layers = self.n_layers
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        for name, options in (("arch", ARCHS), ("norm", NORMS), ("norm_position", NORM_POSITIONS),
                              ("pos", POSITIONS), ("activation", ACTIVATIONS)):
            check_choice(self, name, options)
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.block_pos and self.arch == "encoder_decoder":
            raise ConfigError("block_pos (GLM's 2D positions) belongs to decoder-only models; "
                              "this one is encoder_decoder")
        if self.pos == "rope" and int(self.head_dim * self.rope_fraction) % 2:
            raise ConfigError("RoPE needs an even number of rotary dimensions; change head_dim or rope_fraction")
        if self.rope_scaling is not None and self.rope_scaling.get("type") not in ROPE_SCALINGS:
            raise ConfigError(f"rope_scaling.type must be one of {list(ROPE_SCALINGS)}, got {self.rope_scaling}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.n_layers:
                raise ConfigError(f"layer_types has {len(self.layer_types)} entries for n_layers={self.n_layers}")
            if any(t not in ("global", "local") for t in self.layer_types):
                raise ConfigError("layer_types entries must be 'global' or 'local'")
            if "local" in self.layer_types and not self.sliding_window:
                raise ConfigError("local layers need sliding_window")
        if self.n_experts and not (1 <= self.moe_top_k <= self.n_experts):
            raise ConfigError(f"moe_top_k={self.moe_top_k} must lie in [1, n_experts={self.n_experts}]")
        if self.deepnorm and self.norm_position != "post":
            raise ConfigError("deepnorm is a Post-LN scheme: set norm_position='post'")
        if self.arch == "encoder_decoder" and self.pos == "alibi":
            raise ConfigError("encoder_decoder supports learned/sinusoidal/rope/t5 positions, not alibi")

    # ------------------------------------------------------------------ derived
    @property
    def is_glu(self) -> bool:
        return self.activation in GLU_ACTIVATIONS

    @property
    def has_final_norm(self) -> bool:
        return self.final_norm and self.norm_position != "post"  # Post-LN already ends every block with a norm

    def layer_type(self, i: int) -> str:
        if self.layer_types is not None:
            return self.layer_types[i]
        return "local" if self.sliding_window else "global"

    def is_moe_layer(self, i: int) -> bool:
        return self.n_experts > 0 and (i % self.moe_every == self.moe_every - 1)

    @property
    def deepnorm_alpha(self) -> float:
        # DeepNet (Wang et al. 2022) Table 1, decoder-only: alpha = (2N)^(1/4), beta = (8N)^(-1/4)
        return (2 * self.n_layers) ** 0.25 if self.deepnorm else 1.0

    @property
    def deepnorm_beta(self) -> float:
        return (8 * self.n_layers) ** -0.25 if self.deepnorm else 1.0

    def num_params(self, include_embeddings: bool = True) -> int:
        """Closed-form parameter count (checked against the module in tests)."""
        d, hd, h, kv, f = self.d_model, self.head_dim, self.n_heads, self.n_kv_heads, self.d_ff
        norm_p = d * (2 if self.norm == "layernorm" and self.norm_bias else 1)
        attn = d * hd * (h + 2 * kv) + h * hd * d
        attn += (hd * (h + 2 * kv) if self.qkv_bias else 0) + (d if self.attn_out_bias else 0)
        if self.qk_norm:
            attn += 2 * (hd * (2 if self.norm == "layernorm" and self.norm_bias else 1))
        mlp = d * f * (3 if self.is_glu else 2) + ((f * (2 if self.is_glu else 1) + d) if self.mlp_bias else 0)
        n_norms = 1 if self.parallel_block else (4 if self.norm_position == "sandwich" else 2)
        total = 0
        for i in range(self.n_layers):
            ffn = mlp * self.n_experts + d * self.n_experts if self.is_moe_layer(i) else mlp
            total += attn + ffn + n_norms * norm_p
        if self.arch == "encoder_decoder":
            total += self.n_layers * (attn + norm_p)  # cross-attention + its norm
            total += self.n_encoder_layers * (attn + mlp + n_norms * norm_p) + (norm_p if self.has_final_norm else 0)
        total += norm_p if self.has_final_norm else 0
        if include_embeddings:
            total += self.vocab_size * d * (1 if self.tie_embeddings else 2)
            if self.pos == "learned":
                total += self.max_seq_len * d * (2 if self.arch == "encoder_decoder" else 1)
            if self.pos == "t5":
                total += self.t5_num_buckets * h * (2 if self.arch == "encoder_decoder" else 1)
            if self.block_pos:
                total += self.max_seq_len * d
        return total

    # ------------------------------------------------------------------ io
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown ModelConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named architecture (YAML in llmkit/model/presets), with field overrides."""
        path = PRESET_DIR / f"{name}.yaml"
        if not path.exists():
            raise ConfigError(f"no preset {name!r}; available: {list_presets()}")
        d = yaml.safe_load(path.read_text()) or {}
        d.pop("description", None)
        d.update(overrides)
        return cls.from_dict(d)


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def rope_inv_freq(cfg: ModelConfig, theta: float) -> tuple["torch.Tensor", float]:
    """Inverse frequencies for RoPE with the configured scaling, and the attention factor (YaRN).

    linear: position interpolation (Chen et al. 2023) divides frequencies by the factor;
    ntk: base change theta * factor^(d/(d-2)) ("NTK-aware", bloc97);
    yarn: per-dimension ramp between interpolation and extrapolation + mscale (Peng et al. 2023);
    llama3: the frequency-dependent rule of Llama 3.1 (same as transformers' `_compute_llama3_parameters`).
    """
    import torch

    dim = int(cfg.head_dim * cfg.rope_fraction)
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    sc = cfg.rope_scaling
    if not sc:
        return inv.float(), 1.0
    kind, factor = sc["type"], float(sc.get("factor", 1.0))
    if kind == "linear":
        return (inv / factor).float(), 1.0
    if kind == "ntk":
        base = theta * factor ** (dim / (dim - 2))
        return (1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))).float(), 1.0
    orig = float(sc.get("original_max_position_embeddings", cfg.max_seq_len))
    if kind == "llama3":
        low, high = float(sc.get("low_freq_factor", 1.0)), float(sc.get("high_freq_factor", 4.0))
        low_wl, high_wl = orig / low, orig / high
        wl = 2 * math.pi / inv
        out = torch.where(wl > low_wl, inv / factor, inv)
        smooth = (orig / wl - low) / (high - low)
        mid = (1 - smooth) * out / factor + smooth * out
        is_mid = (wl >= high_wl) & (wl <= low_wl)
        return torch.where(is_mid, mid, out).float(), 1.0
    # yarn
    beta_fast, beta_slow = float(sc.get("beta_fast", 32)), float(sc.get("beta_slow", 1))

    def corr_dim(n_rot: float) -> float:
        return (dim * math.log(orig / (n_rot * 2 * math.pi))) / (2 * math.log(theta))

    lo = max(math.floor(corr_dim(beta_fast)), 0)
    hi = min(math.ceil(corr_dim(beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - lo) / max(hi - lo, 1e-3)).clamp(0, 1)
    extrap_weight = 1 - ramp
    inv = (inv / factor) * (1 - extrap_weight) + inv * extrap_weight
    mscale = float(sc.get("attention_factor", 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0))
    return inv.float(), mscale
