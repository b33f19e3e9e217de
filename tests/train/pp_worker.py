"""Worker for tests/train/test_pipeline.py, launched by torchrun with one CPU process (gloo) per stage.

Every rank builds the same model. Rank 0 first trains a copy of the whole model on the whole batch for three
AdamW steps (the reference), then all ranks train their pipeline stage on the same batch split into
micro-batches. Rank 0 gathers the stages' parameters and writes both runs' losses and the largest parameter
difference to OUT.json.
"""
import copy
import json
import sys

import torch
import torch.distributed as dist

from llmkit.model import ModelConfig, Transformer
from llmkit.train.distributed import init_distributed
from llmkit.train.pipeline import lm_loss, make_stage, pipeline_schedule


def main(schedule: str, n_micro: int, out: str) -> None:
    torch.set_num_threads(1)
    info = init_distributed()
    rank, world = info.rank, info.world_size
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=5, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32,
                      tie_embeddings=False)
    model = Transformer(cfg)
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, 64, (8, 17), generator=g)
    # contiguous: torch 2.11's pipelining checks input strides against the stage's, and a [:, :-1] slice has a row
    # stride of T + 1
    x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
    names = {id(p): n for n, p in model.named_parameters()}

    ref_losses, ref = [], {}
    if rank == 0:
        full = copy.deepcopy(model)
        opt = torch.optim.AdamW(full.parameters(), lr=1e-2, foreach=False)
        for _ in range(3):
            loss = lm_loss(full(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            ref_losses.append(loss.item())
        ref = {n: p.detach() for n, p in full.named_parameters()}

    stage = make_stage(model, rank, world)
    mine = {names[id(p)]: p for p in stage.parameters()}
    sched = pipeline_schedule(stage, rank, world, "cpu", n_micro, schedule=schedule)
    opt = torch.optim.AdamW(stage.parameters(), lr=1e-2, foreach=False)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        mb = []
        if rank == 0:
            sched.step(x)
        elif rank == world - 1:
            sched.step(target=y, losses=mb)
        else:
            sched.step()
        opt.step()
        loss = torch.stack(mb).mean() if mb else torch.zeros(())
        dist.broadcast(loss, src=world - 1)
        losses.append(loss.item())
    gathered = [None] * world
    dist.all_gather_object(gathered, {n: p.detach() for n, p in mine.items()})
    if rank == 0:
        params = {k: v for part in gathered for k, v in part.items()}
        assert set(params) == set(ref), set(ref) ^ set(params)
        diff = max(float((params[k] - ref[k]).abs().max()) for k in ref)
        with open(out, "w") as f:
            json.dump({"losses": losses, "ref_losses": ref_losses, "max_param_diff": diff,
                       "stage_layers": [sorted({int(k.split(".")[1]) for k in part if k.startswith("layers.")})
                                        for part in gathered]}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
