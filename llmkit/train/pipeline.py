"""Pipeline parallelism (survey §4.3.2, the third dimension of 3D parallelism) on PyTorch's own
`torch.distributed.pipelining`.

Implements:
- `split_layers(n_layers, n_stages)`: contiguous, balanced layer ranges, one per stage;
- `make_stage(model, stage, n_stages)`: cuts a decoder-only `Transformer` down, in place, to one stage:
  the first stage keeps the embeddings, the last the final norm and the output head, each its own blocks
  (a block keeps its global index, so per-layer choices such as local/global attention stay as they were).
  An earlier stage returns hidden states [B, T, d] and a later one takes them where token ids would go;
- `pipeline_schedule(...)`: wraps a stage in `PipelineStage` and a GPipe (all forwards, then all backwards)
  or 1F1B (PipeDream-flush: one forward, one backward in the steady state, so at most `n_stages`
  micro-batches of activations are alive per stage) schedule;
- `bubble_fraction(p, m)`: the idle share (p - 1) / (m + p - 1) of a p-stage pipeline fed m micro-batches
  (GPipe, Huang et al. 2019; the same for 1F1B, which saves memory, not bubble);
- `lm_loss(logits, labels)`: the causal-LM loss of the last stage.

The schedules average the per-micro-batch losses (`scale_grads`), so a pipelined step equals one step on
the whole batch when every micro-batch has the same number of target tokens (packed pre-training batches
do; `Trainer` instead weights micro-batches by their token counts). Tied input/output embeddings (the
first and last stage would share one weight), encoder-decoder models and MoE layers (their auxiliary loss
would have to travel between stages) are refused. Pipelines run from Python under `torchrun` (one process
per stage, tested on 2 gloo processes against one process); `Trainer` and `llmkit pretrain` run the data and
tensor parallel layouts of `llmkit.train.distributed`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .objectives import IGNORE

SCHEDULES = ("gpipe", "1f1b")


def split_layers(n_layers: int, n_stages: int) -> list[range]:
    """Contiguous layer ranges, sizes differing by at most one (earlier stages take the remainder)."""
    if n_stages < 1 or n_layers < n_stages:
        raise ValueError(f"{n_layers} layers cannot be split into {n_stages} pipeline stages "
                         f"(need 1 <= stages <= layers)")
    base, extra = divmod(n_layers, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        n = base + (s < extra)
        out.append(range(start, start + n))
        start += n
    return out


def bubble_fraction(n_stages: int, n_microbatches: int) -> float:
    """Share of a pipelined step that each stage spends idle: (p - 1) / (m + p - 1)."""
    if n_stages < 1 or n_microbatches < 1:
        raise ValueError("stages and micro-batches must be >= 1")
    return (n_stages - 1) / (n_microbatches + n_stages - 1)


def make_stage(model: nn.Module, stage: int, n_stages: int) -> nn.Module:
    """Cut `model` (a decoder-only llmkit `Transformer`) down to pipeline stage `stage` of `n_stages`, in place."""
    cfg = model.cfg
    if not 0 <= stage < n_stages:
        raise ValueError(f"stage {stage} is not one of 0..{n_stages - 1}")
    if cfg.arch == "encoder_decoder":
        raise ValueError("pipeline parallelism here takes decoder-only models; an encoder-decoder model is refused")
    if n_stages > 1 and model.lm_head is None:
        raise ValueError("tied input/output embeddings cannot be split between the first and the last pipeline stage; "
                         "use tie_embeddings=false")
    if getattr(cfg, "n_experts", 0):
        raise ValueError("MoE layers are refused under pipeline parallelism (their auxiliary loss would have to "
                         "travel between stages)")
    keep = split_layers(cfg.n_layers, n_stages)[stage]
    model.layers = nn.ModuleList(model.layers[i] for i in keep)
    if stage > 0:
        model.embed = None
        if getattr(model, "pos_embed", None) is not None:
            model.pos_embed = None
    if stage < n_stages - 1:
        model.norm = None
        model.lm_head = None
        model.final_stage = False
    return model


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of one micro-batch (labels already shifted; -100 ignored)."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE)


def pipeline_schedule(stage_model: nn.Module, stage: int, n_stages: int, device: torch.device | str,
                      n_microbatches: int, loss_fn=lm_loss, schedule: str = "1f1b", group=None):
    """The schedule that runs this process's stage: call `.step(input_ids)` on the first stage,
    `.step(target=labels, losses=list)` on the last and `.step()` on the others, then step the optimizer."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if n_microbatches < n_stages:
        raise ValueError(f"{n_microbatches} micro-batches never fill {n_stages} stages (bubble "
                         f"{bubble_fraction(n_stages, n_microbatches):.0%}); use at least {n_stages}")
    st = PipelineStage(stage_model, stage, n_stages, torch.device(device), group=group)
    cls = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
    return cls(st, n_microbatches=n_microbatches, loss_fn=loss_fn)
