"""Training configuration and YAML recipes for pre-training (survey §4.3, Table 5).

Implements:
- `TrainConfig`: every knob of the trainer as a dataclass field (optimiser, schedule, batch ramp,
  accumulation, clipping, z-loss, precision, checkpointing, stability, logging);
- `Recipe`: a YAML file with three sections, `model` (a `ModelConfig` preset name and/or fields),
  `data` (where tokens come from) and `train` (a `TrainConfig`), plus `key=value` overrides such as
  `train.lr=3e-4 model.n_layers=6`;
- `resolve_recipe(name_or_path)`: a path, or a name shipped in `llmkit/recipes/NAME.yaml`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes"

OPTIMIZERS = ("adamw", "adafactor", "muon", "sgd")
SCHEDULES = ("cosine", "linear", "inverse_sqrt", "wsd", "constant")
DTYPES = ("fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    # ---- length and batch (E1)
    max_steps: int = 1000
    micro_batch_size: int = 8  # sequences per forward pass
    batch_size: int | None = None  # sequences per optimiser step (None = micro_batch_size); multiple of it
    batch_ramp_steps: int = 0  # GPT-3: grow the batch linearly from batch_ramp_start to batch_size over these steps
    batch_ramp_start: int | None = None  # sequences per step at step 0 of the ramp
    seq_len: int = 256
    # ---- optimiser (E3; survey Table 5 defaults: AdamW beta2 0.95, eps 1e-8, wd 0.1)
    optimizer: str = "adamw"
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    no_decay_embeddings: bool = True  # norms and biases never decay; embeddings optionally (nanoGPT decays them)
    muon_lr: float = 0.02  # Muon's own lr for hidden matrices (Keller Jordan's default)
    muon_momentum: float = 0.95
    adafactor_decay_rate: float = 0.8  # beta2_t = 1 - t^-0.8 [Shazeer & Stern 2018]
    # ---- schedule (E2)
    schedule: str = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # decay to 10% of max (survey §4.3.1)
    decay_steps: int | None = None  # cosine/linear horizon; None = max_steps
    wsd_decay_frac: float = 0.2  # warmup-stable-decay: last 20% of steps decay (MiniCPM)
    # ---- stabilisation (E4)
    grad_clip: float = 1.0  # 0 disables
    z_loss: float = 0.0  # PaLM uses 1e-4 * log(Z)^2
    spike_detection: bool = False
    spike_zscore: float = 6.0  # loss more than this many EMA std-devs above the EMA mean is a spike
    spike_min_steps: int = 20  # steps of EMA history before spikes are judged (NaN/Inf always)
    spike_ema: float = 0.98
    spike_skip_window: int = 2  # skip the data of steps [s - w, s] after a roll-back (PaLM skips ~200-500 batches)
    max_rollbacks: int = 10
    # ---- precision and memory (F5, F6)
    dtype: str = "fp32"  # autocast dtype; weights stay fp32 (master weights)
    loss_scale_init: float = 2.0 ** 16  # fp16's dynamic loss scale: start, halved on inf/NaN gradients (step skipped),
    loss_scale_growth_interval: int = 2000  # doubled after this many clean steps in a row (torch's GradScaler)
    activation_checkpointing: bool = False
    compile: bool = False
    device: str = "auto"  # auto = cuda if available else cpu
    # ---- checkpoints (E5)
    ckpt_every: int = 0  # 0 = only at the end
    keep_last: int = 3
    # ---- observability
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end
    eval_batches: int = 20
    sample_every: int = 0
    sample_tokens: int = 64
    sample_prompt: str = "\n"
    progress: bool = True
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "llmkit"
    seed: int = 1337

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        self.validate()

    def validate(self) -> None:
        from ..model.config import check_choice  # ConfigError is a ValueError, as callers expect

        for name, options in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("dtype", DTYPES)):
            check_choice(self, name, options, prefix="train.")
        bs = self.global_batch
        if bs % self.micro_batch_size:
            raise ValueError(f"train.batch_size={bs} must be a multiple of train.micro_batch_size={self.micro_batch_size}")
        if self.batch_ramp_steps and (self.batch_ramp_start or 0) <= 0:
            raise ValueError("train.batch_ramp_steps needs train.batch_ramp_start > 0 (sequences per step at step 0)")
        if self.max_steps <= 0:
            raise ValueError(f"train.max_steps must be positive, got {self.max_steps}")
        if not (self.loss_scale_init > 0 and math.isfinite(self.loss_scale_init)) or self.loss_scale_growth_interval < 1:
            raise ValueError(f"train.loss_scale_init must be a positive finite number and train.loss_scale_growth_interval "
                             f">= 1, got {self.loss_scale_init} and {self.loss_scale_growth_interval}")

    @property
    def global_batch(self) -> int:
        return self.batch_size or self.micro_batch_size

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown train fields {unknown}; known fields: {sorted(known)}")
        return cls(**d)


@dataclass
class Recipe:
    """A recipe file: `model:` (preset + fields), `data:` (source), `train:` (TrainConfig), `description:`."""

    model: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    description: str = ""
    path: str | None = None

    def train_config(self) -> TrainConfig:
        return TrainConfig.from_dict(self.train)

    def model_config(self):
        from ..model.config import ModelConfig

        fields = dict(self.model)
        preset = fields.pop("preset", None)
        return ModelConfig.preset(preset, **fields) if preset else ModelConfig.from_dict(fields)

    def to_dict(self) -> dict:
        return {"description": self.description, "model": self.model, "data": self.data, "train": self.train}


def resolve_recipe(spec: str | Path) -> Path:
    """A recipe path, or the name of a recipe shipped in llmkit/recipes (e.g. `shakespeare-char`)."""
    p = Path(spec)
    if p.exists():
        return p
    shipped = RECIPE_DIR / f"{spec}.yaml"
    if shipped.exists():
        return shipped
    names = sorted(q.stem for q in RECIPE_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"recipe {spec!r} is neither a file nor a shipped recipe; shipped: {names}")


def parse_value(text: str) -> Any:
    """`key=value` override values are YAML scalars: 3e-4, true, [0.9, 0.95], cosine."""
    v = yaml.safe_load(text)
    if isinstance(v, str):  # YAML reads "3e-4" as a string (no dot); accept it as a float
        try:
            return float(v)
        except ValueError:
            return v
    return v


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value (e.g. train.lr=3e-4 or model.n_layers=6)")
        key, value = item.split("=", 1)
        parts = key.split(".")
        if parts[0] not in ("model", "data", "train"):
            parts = ["train", *parts]  # bare keys are train fields: lr=1e-3
        node = d
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = parse_value(value)
    return d


def load_recipe(spec: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = resolve_recipe(spec)
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path}: a recipe is a mapping with model/data/train sections")
    unknown = sorted(set(d) - {"model", "data", "train", "description"})
    if unknown:
        raise ValueError(f"{path}: unknown recipe sections {unknown}; use model, data, train, description")
    d = apply_overrides(d, overrides or [])
    r = Recipe(model=d.get("model") or {}, data=d.get("data") or {}, train=d.get("train") or {},
               description=d.get("description", ""), path=str(path))
    r.train_config()  # validate early, with the file name in the error
    return r
