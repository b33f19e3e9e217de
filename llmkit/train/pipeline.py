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
- `lm_loss(logits, labels, z_loss)`: the causal-LM loss of a last stage that returns logits (`pipeline_schedule`'s
  default; `PipelineDist` computes it inside the last stage's forward instead, fused with the head);
- `PipelineDist`: the `dist` that `Trainer` takes, so `torchrun ... -m llmkit pretrain` with LLMKIT_DIST=pp
  (LLMKIT_PP_SCHEDULE=1f1b|gpipe) trains the stages on their own processes, each stage optionally split by
  tensor parallelism over LLMKIT_TP ranks and sharded with FSDP2 over LLMKIT_DP ranks on a ("pp", "dp", "tp")
  mesh (3-D parallelism), with global-norm clipping across stages and shards, evaluation, and checkpoints
  that hold the whole model and resume.

Every stage takes the batch's other model inputs (document masks from `doc_ids`, positions, prefix lengths)
from its own copy of the batch, as keyword arguments that the schedule splits into micro-batches like the ids:
only hidden states travel between stages. The schedules average the per-micro-batch losses (`scale_grads`);
`PipelineDist` weights each micro-batch's loss by its share of the step's target tokens first, so a pipelined
step equals one step on the whole batch also when labels are masked unevenly (-100 spans, prefix LM), as
`Trainer` weights accumulation. Tied input/output embeddings (the first and last stage would share one
weight), T5 relative-position biases (one table for every layer), encoder-decoder models and MoE layers
(their auxiliary loss would have to travel between stages) are refused. Every pre-training objective's
decoder-only batches (causal LM, prefix LM, span corruption, UL2, GLM: the denoisers' rows are padded to the window,
so every micro-batch has the stages' shape) pipeline alike.
Tested on gloo against one process: 2 and 3 stages directly; 2 stages (also with document masks, with prefix-LM
batches and with UL2 batches) and 2 x 2 x 2 (pp, dp, tp) through `Trainer`; the CLI with 2 stages and with
2 x 2 x 2, resume included.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .objectives import IGNORE, cross_entropy, model_inputs

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
    if n_stages > 1 and cfg.pos == "t5":
        raise ValueError("T5 relative-position biases are one table shared by every layer: split between stages, "
                         "each stage would train its own copy; use pos rope or alibi under pipeline parallelism")
    if getattr(cfg, "n_experts", 0):
        raise ValueError("MoE layers are refused under pipeline parallelism (their auxiliary loss would have to "
                         "travel between stages)")
    keep = split_layers(cfg.n_layers, n_stages)[stage]
    model.layers = nn.ModuleList(model.layers[i] for i in keep)
    if stage > 0:
        model.embed = None
        for name in ("pos_embed", "block_pos_embed"):
            if getattr(model, name, None) is not None:
                setattr(model, name, None)
    if stage < n_stages - 1:
        model.norm = None
        model.lm_head = None
        model.final_stage = False
    return model


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, z_loss: float = 0.0) -> torch.Tensor:
    """The last stage's loss: `objectives.cross_entropy` (mean next-token CE over labels != -100, float32, plus
    PaLM's z-loss when z_loss > 0) in the (output, target) form that torch's pipeline schedules call."""
    return cross_entropy(logits, labels, z_loss)[0]


class _LossStage(nn.Module):
    """The last stage as `PipelineDist`'s schedules see it: its forward also takes the micro-batch's labels (a
    schedule keyword argument) and computes the loss inside the model's forward (`Transformer.loss`: the head fused
    with the cross-entropy, never materialising the logits, also under FSDP2, whose hooks gather the head's weight
    for that forward). It returns the micro-batch's summed loss n_i * loss_i as a [1] tensor (the schedules merge
    the last stage's outputs along dim 0), which `_Scaled` turns into the step's token mean."""

    def __init__(self, stage: nn.Module, z_loss: float):
        super().__init__()
        self.stage, self.z_loss = stage, z_loss

    def forward(self, x: torch.Tensor, labels: torch.Tensor, **kw) -> torch.Tensor:
        loss, _ = self.stage(x, labels=labels, z_loss=self.z_loss, **kw)
        return (loss * (labels != IGNORE).sum()).reshape(1)


class _Scaled:
    """The schedule's loss for `_LossStage`: n_i * loss_i times m / N (N the step's target tokens; `scale` = m / N
    is set before each step). The schedules average their m micro-batch losses (`scale_grads`), which then gives
    the mean over the step's target tokens, whatever their split between micro-batches."""

    scale = 1.0

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return output.sum() * self.scale


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


class PipelineDist:
    """The `dist` that `Trainer` takes for a pipeline under `torchrun`: `world_size / (dp * tp)` stages, each
    split over `tp` tensor-parallel ranks (`distributed.apply_tp`) and sharded with FSDP2 over `dp`
    data-parallel ranks (ranks laid out stage-major on a ("pp", "dp", "tp") mesh, torchtitan's layout).
    Tensor-parallel peers read the same batches; with dp = 1 every rank does.

    A step's micro-batches are stacked into one batch that the schedule splits again, so a step runs as many
    pipeline micro-batches as the Trainer's accumulation (`batch_size / micro_batch_size`, at least the
    number of stages). The loss is the causal-LM loss (+ z-loss) of the last stage over the step's target
    tokens (micro-batches weighted by their token counts), computed inside the last stage's forward with its
    head fused with the cross-entropy (`_LossStage`: no logits kept, also under FSDP2), broadcast along the
    pipeline and averaged over the data-parallel ranks. Clipping takes the global norm over all stages and
    shards. Checkpoints hold the whole model under its usual parameter names (rank 0 writes them; `llmkit.load`
    reads them like any other) and the optimizer state keyed by those names, so a run resumes on the same
    layout. Refused with it: a custom loss function, fp16 (the schedule calls backward itself, out of the loss
    scaler's reach) and torch.compile of the whole model.
    """

    def __init__(self, schedule: str = "1f1b", dp: int = 1, tp: int = 1, info=None):
        from .distributed import init_distributed

        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r}; choose one of {', '.join(SCHEDULES)}")
        self.info = info or init_distributed()
        self.rank, self.world_size, self.device = self.info.rank, self.info.world_size, self.info.device
        if dp < 1 or tp < 1 or self.world_size % (dp * tp):
            raise ValueError(f"world size {self.world_size} is not a multiple of dp*tp = {dp}*{tp}")
        self.n_stages, self.dp_world, self.tp = self.world_size // (dp * tp), dp, tp
        self.per_stage = dp * tp  # stage-major: ranks [s*dp*tp, (s+1)*dp*tp) hold stage s
        self.stage, within = divmod(self.rank, self.per_stage)
        self.dp_rank = within // tp  # tensor-parallel peers read the same batch
        self.pp_group = self.dp_mesh = self.tp_mesh = self.dp_group = None
        if self.per_stage > 1:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(self.device.type, (self.n_stages, dp, tp), mesh_dim_names=("pp", "dp", "tp"))
            self.pp_group = mesh["pp"].get_group()
            self.dp_mesh = mesh["dp"] if dp > 1 else None
            self.dp_group = mesh["dp"].get_group()
            self.tp_mesh = mesh["tp"] if tp > 1 else None
        self.schedule = schedule
        self.model: nn.Module | None = None
        self._schedules: dict = {}
        self._global: dict[int, str] = {}  # id(parameter) -> its name in the whole model
        self._names: dict[str, str] = {}  # the stage's parameter names -> the whole model's

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.n_stages - 1

    def wrap(self, model: nn.Module) -> nn.Module:
        names = {id(p): n for n, p in model.named_parameters()}
        self.model = make_stage(model.to(self.device), self.stage, self.n_stages)
        self._names = {n: names[id(p)] for n, p in self.model.named_parameters()}
        # (apply_tp and fully_shard swap the parameters for DTensors under the same names)
        if self.tp_mesh is not None:
            from .distributed import apply_tp

            apply_tp(self.model, self.tp_mesh)
        if self.dp_mesh is not None:
            from .distributed import DistConfig, apply_fsdp

            apply_fsdp(self.model, self.dp_mesh, DistConfig(strategy="fsdp"))
        self._global = {id(p): self._names[n] for n, p in self.model.named_parameters()}
        return self.model

    def sync_grads(self, model: nn.Module) -> None:
        """After the step's backward passes: the TP ranks' partial gradients summed (`distributed.sync_tp_grads`)."""
        if self.tp > 1:
            from .distributed import sync_tp_grads

            sync_tp_grads(model)

    # ------------------------------------------------------------------ steps
    def pipeline_step(self, model: nn.Module, batches: list[dict], z_loss: float = 0.0) -> torch.Tensor:
        """Forward and backward of one optimizer step's micro-batches through the pipeline; the loss over the
        step's target tokens (micro-batches weighted by their token counts, as `Trainer` weights accumulation)."""
        m = len(batches)
        if (m, z_loss) not in self._schedules:
            loss_fn = _Scaled()
            stage = _LossStage(model, z_loss) if self.last else model
            self._schedules[(m, z_loss)] = loss_fn, pipeline_schedule(
                stage, self.stage, self.n_stages, self.device, m, loss_fn, self.schedule, group=self.pp_group)
        loss_fn, sched = self._schedules[(m, z_loss)]
        losses: list = []
        # every stage takes the batch's other model inputs (document masks, positions, prefix lengths) from its own
        # copy of the batch, as keyword arguments that the schedule splits into micro-batches like the ids
        each = [model_inputs(b) for b in batches]
        kw = {k: torch.cat([e[k] for e in each]) for k in each[0]}
        if self.first:
            sched.step(torch.cat([b["input_ids"] for b in batches]), **kw)
        elif self.last:
            labels = torch.cat([b["labels"] for b in batches])
            n = (labels != IGNORE).sum()
            if self.dp_world > 1:  # the step's target tokens on every data-parallel rank (the ranks' gradients
                dist.all_reduce(n, group=self.dp_group)  # are averaged): uneven masks weigh as in one big batch
            loss_fn.scale = m * self.dp_world / max(int(n), 1)
            sched.step(target=labels, losses=losses, labels=labels, **kw)
        else:
            sched.step(**kw)
        return self._from_last(torch.stack(losses).mean().detach() if self.last else None)

    @torch.no_grad()
    def pipeline_eval(self, model: nn.Module, batch: dict, z_loss: float = 0.0, dp_mean: bool = True) -> torch.Tensor:
        """The loss of one batch, forward only: each stage receives, runs and sends on its hidden states. On every
        rank: the mean over the data-parallel ranks, or with dp_mean=False this pipeline's own."""
        ids = batch["input_ids"]
        x = ids
        if not self.first:
            x = torch.empty(*ids.shape, model.cfg.d_model, dtype=next(model.parameters()).dtype, device=self.device)
            dist.recv(x, src=self.rank - self.per_stage)  # the previous stage's rank at the same (dp, tp) place
        if self.last:  # the loss inside the model's forward, its head fused with the cross-entropy
            loss = model(x, **model_inputs(batch), labels=batch["labels"], z_loss=z_loss)[0]
            return self._from_last(loss, dp_mean)
        dist.send(model(x, **model_inputs(batch)).contiguous(), dst=self.rank + self.per_stage)
        return self._from_last(None, dp_mean)

    def _from_last(self, loss: torch.Tensor | None, dp_mean: bool = True) -> torch.Tensor:
        """The last stage's loss on every rank of its pipeline, then (dp_mean) averaged over the data-parallel
        ranks."""
        t = loss.float().reshape(()) if loss is not None else torch.zeros((), device=self.device)
        if self.pp_group is None:
            dist.broadcast(t, src=self.world_size - 1)
            return t
        dist.broadcast(t, group=self.pp_group, group_src=self.n_stages - 1)
        if not dp_mean:
            return t
        dist.all_reduce(t, group=self.dp_group)  # (tensor-parallel peers hold the same value already)
        return t / self.dp_world

    def reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of `t` over all ranks (the Trainer's evaluation: every rank of a pipeline holds its loss)."""
        from .distributed import mean_over_ranks

        return mean_over_ranks(t)

    def clip_grad_norm(self, params, max_norm: float) -> torch.Tensor:
        """Global-norm clipping across the stages (each holds a disjoint part of the parameters) and, under FSDP2,
        their shards."""
        from .distributed import scale_to_norm, total_norm

        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        sq = total_norm(grads).to(self.device).pow(2)  # over this stage's shards (dp, tp)
        dist.all_reduce(sq, group=self.pp_group)
        return scale_to_norm(grads, sq.sqrt().float(), max_norm)

    # ------------------------------------------------------------------ checkpoints (whole-model names)
    def _gather(self, obj):
        """`obj` of every stage (with dp > 1, one rank of each stage's data-parallel group per entry)."""
        out = [None] * (self.n_stages if self.pp_group is not None else self.world_size)
        dist.all_gather_object(out, obj, group=self.pp_group)
        return out

    def model_state_dict(self, model: nn.Module) -> dict:
        mine = {self._global[id(p)]: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
                for p in model.parameters()}
        return {k: v for part in self._gather(mine) for k, v in part.items()}

    # torch.distributed.checkpoint's state-dict API gathers FSDP2 / TP shards full (and takes plain tensors as
    # they are), keyed by the stage's own names; `_names` maps them to the whole model's
    def load_model_state_dict(self, model: nn.Module, sd: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, {n: sd[g] for n, g in self._names.items()},
                             options=StateDictOptions(full_state_dict=True))

    def optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """AdamW & co. state of every stage, keyed by whole-model parameter names (collective)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        sd = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
        state = {self._names[n]: {k: v.cpu() if torch.is_tensor(v) else v for k, v in st.items()}
                 for n, st in sd["state"].items()}
        groups = [{**g, "params": [self._names[n] for n in g["params"]]} for g in sd["param_groups"]]
        merged_state, merged_groups = {}, []
        for st, gs in self._gather((state, groups)):  # each stage's groups as they are (their splits may differ)
            merged_state.update(st)
            merged_groups += gs
        return {"state": merged_state, "param_groups": merged_groups}

    def load_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer, sd: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        local = {g: n for n, g in self._names.items()}
        missing = [g for g in local if g not in sd["state"]]
        if any(not isinstance(k, str) for k in sd["state"]) or (missing and sd["state"]):
            raise ValueError("this checkpoint's optimizer state was not written by a pipeline run with the same "
                             f"parameters (missing: {missing[:3]}); resume it with the layout that wrote it")
        saved_group = {n: g for g in sd["param_groups"] for n in g["params"]}  # whole-model name -> its group
        groups = []
        for g in optimizer.param_groups:  # the hyperparameters saved with the group of this group's parameters
            names = [self._global[id(p)] for p in g["params"]]
            saved = {k: v for k, v in saved_group[names[0]].items() if k != "params"}
            groups.append({**saved, "params": [local[n] for n in names]})
        state = {local[k]: v for k, v in sd["state"].items() if k in local}
        set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                                 options=StateDictOptions(full_state_dict=True))

    def barrier(self) -> None:
        dist.barrier()
