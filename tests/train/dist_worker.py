"""Worker for tests/train/test_distributed.py, launched by torchrun with 2 CPU processes (gloo).

Trains a tiny Transformer for a few AdamW steps on one fixed global batch under a strategy and writes
the losses and the full final parameters (rank 0) so the test can compare with one process.
"""
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file

from llmkit.model import ModelConfig, Transformer
from llmkit.train.distributed import (DistConfig, data_parallel_rank, full_state_dict, init_distributed,
                                      load_distributed, parallelize, save_distributed)


def main(strategy: str, out: str, ckpt: str | None = None) -> None:
    torch.set_num_threads(1)
    info = init_distributed()
    # "fsdp-offload": FSDP2 with CPUOffloadPolicy (shards kept on the CPU between uses; accelerators only)
    cfg = DistConfig(strategy=strategy.removesuffix("-offload"), tp=2 if "tp" in strategy else 1,
                     cpu_offload=strategy.endswith("-offload"))
    torch.manual_seed(0)
    mcfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
    model = parallelize(Transformer(mcfg), info, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, 64, (4, 13), generator=g)
    r, w = data_parallel_rank(info, cfg)
    local = batch.chunk(w)[r] if strategy != "none" else batch
    losses = []
    for _ in range(3):
        logits = model(local[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 64), local[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        rep = loss.detach().clone()
        if dist.is_initialized():
            dist.all_reduce(rep)
            rep /= info.world_size
        losses.append(rep.item())
    if ckpt:  # sharded save, a step that changes the weights, then load: the weights come back exactly
        save_distributed(ckpt, model, opt)
        before = full_state_dict(model)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        load_distributed(ckpt, model, opt)
        after = full_state_dict(model)
        assert all(torch.equal(before[k], after[k]) for k in before), "distributed checkpoint did not round-trip"
    # ZeRO's point (F4): the bytes of optimizer state each rank holds (local shards of DTensors)
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    state_bytes = sum(local(v).numel() * v.element_size() for st in opt.state.values() for k, v in st.items()
                      if k != "step")
    per_rank = [None] * info.world_size
    if dist.is_initialized():
        dist.all_gather_object(per_rank, state_bytes)
    else:
        per_rank = [state_bytes]
    sd = full_state_dict(model)
    if info.rank == 0:
        with open(out + ".state_bytes.json", "w") as f:
            json.dump(per_rank, f)
        save_file({k: v.contiguous() for k, v in sd.items()}, out + ".safetensors")
        with open(out + ".json", "w") as f:
            json.dump(losses, f)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
