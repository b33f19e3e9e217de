"""Scalable training on PyTorch's own distributed engine (survey §4.3.2: 3D parallelism, ZeRO).

Implements, applied to a plain `Transformer` from outside (torchtitan style, never woven into the model):
- process-group setup from `torchrun`'s environment (gloo on CPU, NCCL on CUDA);
- a 2-D device mesh ("dp", "tp");
- data parallelism: DDP, or FSDP2 `fully_shard` per block + root (ZeRO-3 style sharding of parameters,
  gradients and optimizer state) with optional CPU offload and bf16 mixed precision;
- tensor parallelism with DTensor plans (Megatron-LM layout: q/k/v, gate/up column-wise; o/down row-wise),
  composable with FSDP2 on the "dp" mesh dimension;
- distributed checkpoints with `torch.distributed.checkpoint` (each rank writes its shards; loads reshard).

Pipeline parallelism, the third dimension of 3D parallelism, is `llmkit.train.pipeline` (LLMKIT_DIST=pp, with
FSDP2 and TP inside each stage on a ("pp", "dp", "tp") mesh). Not covered: sequence/context
parallelism; MoE expert parallelism (MoE layers stay replicated under TP and are refused there).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("none", "ddp", "fsdp", "tp", "fsdp+tp")


@dataclass
class DistConfig:
    strategy: str = "none"  # none | ddp | fsdp | tp | fsdp+tp
    tp: int = 1  # tensor-parallel degree (the rest of the world is data-parallel)
    cpu_offload: bool = False  # FSDP2: keep sharded parameters and optimizer state on the CPU
    mixed_precision: str | None = None  # FSDP2: "bfloat16" params/compute with float32 reduction
    reshard_after_forward: bool = True


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group that `torchrun` describes in the environment; a no-op for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo(device=torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"))
    return DistInfo(rank, world, local, device)


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def build_mesh(info: DistInfo, tp: int = 1):
    from torch.distributed.device_mesh import init_device_mesh

    if info.world_size % tp:
        raise ValueError(f"world size {info.world_size} is not divisible by tp={tp}")
    return init_device_mesh(info.device.type, (info.world_size // tp, tp), mesh_dim_names=("dp", "tp"))


def by_mesh(tensors) -> list[list[torch.Tensor]]:
    """`tensors` grouped by DTensor mesh (plain tensors in one group of their own), in first-seen order: torch's
    fused and foreach kernels take one kind of tensor on one mesh per call."""
    groups: dict = {}
    for t in tensors:
        groups.setdefault(getattr(t, "device_mesh", None), []).append(t)
    return list(groups.values())


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm (float64) of gradients that may be DTensors on different meshes and plain tensors: each
    mesh's norm is reduced over its shards (`full_tensor`), plain tensors count once, and the parts combine."""
    parts = [torch.nn.utils.get_total_norm(gs) for gs in by_mesh(grads)]
    parts = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in parts]
    if not parts:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack([n.double() for n in parts]).pow(2).sum().sqrt()


def scale_to_norm(grads: list[torch.Tensor], norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Clip `grads` whose global norm is `norm` to `max_norm` (torch's factor max_norm / (norm + 1e-6), applied
    only below 1; a NaN / inf norm scales by NaN / 0 as torch does); returns `norm`."""
    coef = max_norm / (float(norm) + 1e-6)
    if not coef >= 1.0:
        for gs in by_mesh(grads):
            torch._foreach_mul_(gs, coef)
    return norm


def apply_tp(model: nn.Module, tp_mesh) -> nn.Module:
    """Shard attention heads and FFN width over `tp_mesh` (Megatron-LM column/row split): every block of the
    decoder and of an encoder, cross-attention included. Position biases follow the heads: each rank keeps the
    ALiBi slopes of its own heads, and T5's bias table is split by head columns (a DTensor, so each rank trains
    its heads' biases). QK-norm weights (one over head_dim, for all heads) stay whole on every rank, which computes
    their gradient from its own heads only: `sync_tp_grads` sums it over the TP ranks after each backward, as
    Megatron-LM all-reduces such duplicated weights' gradients."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    cfg = model.cfg
    n = tp_mesh.size()
    if cfg.n_heads % n or cfg.n_kv_heads % n:
        raise ValueError(f"tensor parallelism needs n_heads={cfg.n_heads} and n_kv_heads={cfg.n_kv_heads} divisible by tp={n}")
    if cfg.n_experts:
        raise ValueError("tensor parallelism of MoE layers is not supported; use fsdp or ddp")

    def heads(prefix: str) -> dict:
        return {f"{prefix}.q": ColwiseParallel(), f"{prefix}.k": ColwiseParallel(), f"{prefix}.v": ColwiseParallel(),
                f"{prefix}.o": RowwiseParallel()}

    group = tp_mesh.get_group()
    for blk in [*model.layers, *(getattr(model, "encoder", None) or [])]:
        plan = heads("attn")
        if blk.cross_attn is not None:
            plan.update(heads("cross_attn"))
        if blk.mlp.gate is not None:
            plan["mlp.gate"] = ColwiseParallel()
        plan.update({"mlp.up": ColwiseParallel(), "mlp.down": RowwiseParallel()})
        parallelize_module(blk, tp_mesh, plan)
        for attn in (blk.attn, blk.cross_attn):
            for norm in (getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)):
                if norm is not None:  # one weight over head_dim serves all heads; each rank sees only its own
                    norm.tp_partial_group = group  # -> `sync_tp_grads` sums its gradient over the TP ranks
    for name in ("t5_bias", "enc_t5_bias"):  # [buckets, heads] -> this rank's head columns
        if getattr(model, name, None) is not None:
            parallelize_module(getattr(model, name), tp_mesh, {"emb": ColwiseParallel()})
    if getattr(model, "alibi", None) is not None:  # (a non-persistent buffer: checkpoints keep no slopes)
        local = cfg.n_heads // n
        r = tp_mesh.get_local_rank()
        model.alibi = model.alibi[r * local:(r + 1) * local].clone()
    return model


def sync_tp_grads(model: nn.Module) -> None:
    """Sum over the tensor-parallel ranks the gradients that each rank computes from its own heads only (the
    modules `apply_tp` marks: QK-norm weights), so that these duplicated weights take the one-process step. Under
    FSDP2 + TP the gradient is a DTensor sharded over dp; TP peers hold the same shard and sum its local part.
    One all-reduce for all of them (they are small: two head_dim vectors a layer)."""
    group, grads = None, []
    for m in model.modules():
        if getattr(m, "tp_partial_group", None) is not None:
            group = m.tp_partial_group
            grads += [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                      for p in m.parameters() if p.grad is not None]
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        torch._foreach_copy_(grads, [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads)])


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean of `t` over every rank of the default group (`t` itself outside torchrun)."""
    if not dist.is_initialized():
        return t
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def apply_fsdp(model: nn.Module, dp_mesh, cfg: DistConfig) -> nn.Module:
    """FSDP2: shard each block, then the root (embeddings, final norm, head)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kw = {"mesh": dp_mesh, "reshard_after_forward": cfg.reshard_after_forward}
    if cfg.cpu_offload:
        if dp_mesh is not None and dp_mesh.device_type == "cpu":  # torch would fail deep inside fully_shard
            raise ValueError("FSDP2 cpu_offload moves shards from an accelerator to the CPU between uses; this mesh is "
                             "on the CPU already, where training keeps everything in CPU memory anyway: drop "
                             "LLMKIT_FSDP_CPU_OFFLOAD / cpu_offload")
        kw["offload_policy"] = CPUOffloadPolicy()
    if cfg.mixed_precision:
        dt = getattr(torch, cfg.mixed_precision)
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=dt, reduce_dtype=torch.float32)
    for blk in model.layers:
        fully_shard(blk, **kw)
    for blk in getattr(model, "encoder", None) or []:
        fully_shard(blk, **kw)
    fully_shard(model, **kw)
    return model


def parallelize(model: nn.Module, info: DistInfo, cfg: DistConfig) -> nn.Module:
    """Apply the configured strategy; returns the module to train (DDP wraps, FSDP2/TP modify in place)."""
    if cfg.strategy not in STRATEGIES:
        raise ValueError(f"strategy={cfg.strategy!r} is unknown; choose one of {list(STRATEGIES)}")
    model.to(info.device)
    if cfg.strategy == "none" or info.world_size == 1:
        return model
    if cfg.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    tp = cfg.tp if "tp" in cfg.strategy else 1
    if cfg.strategy == "tp":
        tp = info.world_size
    mesh = build_mesh(info, tp)
    if tp > 1:
        apply_tp(model, mesh["tp"])
    if "fsdp" in cfg.strategy:
        apply_fsdp(model, mesh["dp"], cfg)
    return model


def data_parallel_rank(info: DistInfo, cfg: DistConfig) -> tuple[int, int]:
    """(rank, world) for slicing data: tensor-parallel peers must see the same batch."""
    tp = info.world_size if cfg.strategy == "tp" else (cfg.tp if "tp" in cfg.strategy else 1)
    return info.rank // tp, info.world_size // tp


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and not hasattr(model, "cfg") else model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gather a full (unsharded) CPU state dict on every rank; works for plain, DDP, FSDP2 and TP models."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    m = unwrap(model)
    if not dist.is_initialized():
        return {k: v.detach().cpu() for k, v in m.state_dict().items()}
    return get_model_state_dict(m, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_distributed(path: str, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Sharded checkpoint with torch.distributed.checkpoint (every rank writes its own shards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    m = unwrap(model)
    if optimizer is not None:
        msd, osd = get_state_dict(m, optimizer)
        state = {"model": msd, "optim": osd}
    else:
        state = {"model": m.state_dict()}
    dcp.save(state, checkpoint_id=path)


def load_distributed(path: str, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    m = unwrap(model)
    if optimizer is not None:
        msd, osd = get_state_dict(m, optimizer)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(m, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        state = {"model": m.state_dict()}
        dcp.load(state, checkpoint_id=path)
        m.load_state_dict(state["model"])


class TorchDist:
    """The `dist` object the Trainer takes (see llmkit/train/trainer.py): strategy applied from outside.

    `wrap` applies DDP / FSDP2 / TP; state dicts are gathered full on every rank and loaded back into
    sharded modules, so a llmkit checkpoint written by rank 0 is the same file as a single-process one.
    """

    def __init__(self, cfg: DistConfig | None = None, info: DistInfo | None = None):
        self.cfg = cfg or DistConfig(strategy="ddp")
        self.info = info or init_distributed()
        self.rank, self.world_size, self.device = self.info.rank, self.info.world_size, self.info.device
        self.dp_rank, self.dp_world = data_parallel_rank(self.info, self.cfg)
        self.model: nn.Module | None = None

    def wrap(self, model: nn.Module) -> nn.Module:
        self.model = parallelize(model, self.info, self.cfg)
        return self.model

    def sync_grads(self, model: nn.Module) -> None:
        """After the step's backward passes: the TP ranks' partial gradients summed (`sync_tp_grads`)."""
        if "tp" in self.cfg.strategy:
            sync_tp_grads(model)

    def no_sync(self, model: nn.Module):
        import contextlib

        if hasattr(model, "no_sync"):  # DDP: skip the all-reduce on all but the last micro-batch
            return model.no_sync()
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
            model.set_requires_gradient_sync(False)
            return _ResyncOnExit(model)
        return contextlib.nullcontext()

    def reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        return mean_over_ranks(t)

    def clip_grad_norm(self, params, max_norm: float) -> torch.Tensor:
        """Global-norm clipping over DTensor shards (the norm reduced across ranks) and plain tensors.

        torch's clip_grad_norm_ takes one kind of gradient on one mesh. Tensor parallelism leaves embeddings,
        norms and head as plain tensors (the same on every rank), and FSDP2 + TP puts the TP'd matrices on the
        2-D (dp, tp) mesh and the rest on the dp mesh. So each mesh's norm is taken apart and combined, and each
        mesh's gradients are scaled in one foreach call (on every layout: one mesh is the simple case)."""
        live = self.model.parameters() if self.model is not None else params
        grads = [p.grad for p in live if p.grad is not None]
        return scale_to_norm(grads, total_norm(grads).float(), max_norm)

    def model_state_dict(self, model: nn.Module) -> dict:
        return full_state_dict(model)

    def load_model_state_dict(self, model: nn.Module, sd: dict) -> None:
        if not dist.is_initialized():
            model.load_state_dict(sd)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(unwrap(model), sd, options=StateDictOptions(full_state_dict=True))

    @property
    def sharded(self) -> bool:
        """Whether parameters (and so optimizer states) are DTensor shards: FSDP2 or TP in a process group."""
        return dist.is_initialized() and self.cfg.strategy not in ("none", "ddp")

    def optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer state a llmkit checkpoint stores. DDP: every rank holds all of it. FSDP2/TP: the
        states are DTensor shards; gather them full onto rank 0's CPU, keyed by parameter name (collective:
        every rank must call it)."""
        if not self.sharded:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(unwrap(model), optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer, sd: dict) -> None:
        """Inverse of `optimizer_state_dict`: every rank reads the full state and keeps its own shards."""
        if not self.sharded:
            optimizer.load_state_dict(sd)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(unwrap(model), optimizer, sd, options=StateDictOptions(full_state_dict=True))

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()


def setup_from_env(recipe=None) -> TorchDist:
    """The `dist` of `llmkit pretrain` under torchrun. Strategy and degrees come from the environment
    (LLMKIT_DIST=ddp|fsdp|tp|fsdp+tp|pp, default ddp; LLMKIT_TP=N; LLMKIT_DP=N with pp;
    LLMKIT_FSDP_CPU_OFFLOAD=1), so one recipe runs unchanged on one process or many."""
    strategy = os.environ.get("LLMKIT_DIST", "ddp")
    if strategy == "pp":  # pipeline stages (llmkit.train.pipeline), LLMKIT_PP_SCHEDULE=1f1b|gpipe, each stage
        from .pipeline import PipelineDist  # on LLMKIT_DP FSDP2 ranks x LLMKIT_TP tensor-parallel ranks (default 1)

        return PipelineDist(schedule=os.environ.get("LLMKIT_PP_SCHEDULE", "1f1b"),
                            dp=int(os.environ.get("LLMKIT_DP", "1")), tp=int(os.environ.get("LLMKIT_TP", "1")))
    if strategy not in STRATEGIES or strategy == "none":
        raise SystemExit(f"LLMKIT_DIST={strategy!r}: choose one of ddp, fsdp, tp, fsdp+tp, pp")
    cfg = DistConfig(strategy=strategy, tp=int(os.environ.get("LLMKIT_TP", "2" if "tp" in strategy else "1")),
                     cpu_offload=os.environ.get("LLMKIT_FSDP_CPU_OFFLOAD", "0") == "1")
    return TorchDist(cfg)


class _ResyncOnExit:
    def __init__(self, model):
        self.model = model

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.model.set_requires_gradient_sync(True)
        return False
