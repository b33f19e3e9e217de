"""Optimisation presets: the rows of survey Table 5 (§4.3.1) as `TrainConfig`s.

Each row is data (batch in tokens, possibly a ramp "start→end"; peak LR; warm-up yes/no; decay; optimiser;
precision; weight decay; clipping; dropout), transcribed from the survey ([ZH] Table 5, values confirmed in
../shared/SURVEY_CHECKLIST.md §11). `table5_config(name, seq_len, micro_batch_size, max_steps)` turns a row
into a runnable `TrainConfig` for a given context length and run length, and returns the dropout the row
asks for (a model setting). Mapping choices, stated because the table leaves them open:
- "yes" warm-up = 0.375% of the steps (inside the survey's 0.1-0.5%); "no" = none;
- "Adam" with weight decay 0.1 is run as decoupled AdamW (the table lists both names for the same practice);
- PaLM's "lr²" weight decay: decoupled decay multiplies by lr, so weight_decay = lr gives lr² per step;
- OPT's "manual" decay (hand restarts during the run) is a linear decay to 10% here;
- "–" precision = fp32, "–" clipping = none, "–" weight decay = 0;
- a batch ramp "a→b" grows linearly over the first 1% of the steps (GPT-3 grew it over the first 4-12B tokens).
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import TrainConfig


@dataclass(frozen=True)
class Row:
    batch_tokens: tuple[float, float]  # (start, end) of the batch-size ramp; equal when there is none
    lr: float
    warmup: bool
    decay: str  # cosine | linear | inverse_sqrt
    optimizer: str  # adamw | adafactor
    precision: str  # fp16 | bf16 | fp32 ("–")
    weight_decay: float | str  # a number, or "lr^2"
    clip: float  # 0 = none
    dropout: float | None


K, M = 1e3, 1e6
TABLE5: dict[str, Row] = {
    "gpt3-175b": Row((32 * K, 3.2 * M), 6e-5, True, "cosine", "adamw", "fp16", 0.1, 1.0, None),
    "opt-175b": Row((2 * M, 2 * M), 1.2e-4, True, "linear", "adamw", "fp16", 0.1, 0.0, 0.1),
    "palm-540b": Row((1 * M, 4 * M), 1e-2, False, "inverse_sqrt", "adafactor", "bf16", "lr^2", 1.0, 0.1),
    "bloom-176b": Row((4 * M, 4 * M), 6e-5, True, "cosine", "adamw", "bf16", 0.1, 1.0, 0.0),
    "mt-nlg-530b": Row((64 * K, 3.75 * M), 5e-5, True, "cosine", "adamw", "bf16", 0.1, 1.0, None),
    "gopher-280b": Row((3 * M, 6 * M), 4e-5, True, "cosine", "adamw", "bf16", 0.0, 1.0, None),
    "chinchilla-70b": Row((1.5 * M, 3 * M), 1e-4, True, "cosine", "adamw", "bf16", 0.0, 0.0, None),
    "galactica-120b": Row((2 * M, 2 * M), 7e-6, True, "linear", "adamw", "fp32", 0.1, 1.0, 0.1),
    "llama-65b": Row((4 * M, 4 * M), 1.5e-4, True, "cosine", "adamw", "fp32", 0.1, 1.0, None),
    "glm-130b": Row((0.4 * M, 8.25 * M), 8e-5, True, "cosine", "adamw", "fp16", 0.1, 1.0, 0.1),
    "t5-11b": Row((64 * K, 64 * K), 1e-2, False, "inverse_sqrt", "adafactor", "fp32", 0.0, 0.0, 0.1),
}


def table5_config(name: str, seq_len: int = 2048, micro_batch_size: int = 1, max_steps: int = 100_000,
                  **overrides) -> tuple[TrainConfig, float | None]:
    """(TrainConfig, dropout) reproducing Table 5 row `name` at this context length and run length."""
    if name not in TABLE5:
        raise ValueError(f"no Table 5 row {name!r}; rows: {sorted(TABLE5)}")
    r = TABLE5[name]

    def seqs(tokens: float) -> int:  # sequences per step, a whole number of micro-batches
        return max(micro_batch_size, round(tokens / seq_len / micro_batch_size) * micro_batch_size)

    start, end = seqs(r.batch_tokens[0]), seqs(r.batch_tokens[1])
    fields = dict(
        max_steps=max_steps, micro_batch_size=micro_batch_size, batch_size=end, seq_len=seq_len,
        batch_ramp_steps=max(1, max_steps // 100) if start != end else 0, batch_ramp_start=start if start != end else None,
        optimizer=r.optimizer, lr=r.lr, betas=(0.9, 0.95), eps=1e-8,  # survey §4.3.1: beta2 0.95, eps 1e-8
        weight_decay=r.lr if r.weight_decay == "lr^2" else float(r.weight_decay),
        schedule=r.decay, warmup_steps=max(1, round(0.00375 * max_steps)) if r.warmup else 0,
        min_lr_ratio=0.1 if r.decay in ("cosine", "linear") else 0.0,
        grad_clip=r.clip, dtype=r.precision, no_decay_embeddings=True,
    )
    fields.update(overrides)
    return TrainConfig(**fields), r.dropout
