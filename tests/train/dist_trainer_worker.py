"""Worker for test_distributed_trainer: the one Trainer under torchrun (gloo) with TorchDist, or alone."""
import json
import sys

import numpy as np
import torch

import llmkit.train.fused_loss as fused_loss
from llmkit.data.shards import BatchLoader, TokenDataset
from llmkit.model import ModelConfig, Transformer
from llmkit.train.config import TrainConfig
from llmkit.train.denoising import DenoisingLoader, special_vocab
from llmkit.train.distributed import DistConfig, TorchDist, full_state_dict
from llmkit.train.memory import estimate_memory
from llmkit.train.pipeline import PipelineDist
from llmkit.train.trainer import Trainer


class PrefixLM:
    """Prefix-LM batches: the first (5 * r) % 13 tokens of the step's r-th sequence of 8 are a bidirectional prefix
    (`prefix_len`) without targets (-100), so the micro-batches of a step hold unequal numbers of target tokens
    (for ranks that read the whole batch)."""

    def __init__(self, loader):
        self.loader, self.row = loader, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        b = next(self.loader)
        labels = b["labels"].clone()
        prefix = torch.tensor([(5 * ((self.row + i) % 8)) % 13 for i in range(labels.shape[0])])
        for i, n in enumerate(prefix.tolist()):
            labels[i, :n] = -100
        self.row += labels.shape[0]
        return {**b, "labels": labels, "prefix_len": prefix}


def main(strategy: str, out: str) -> None:
    torch.set_num_threads(1)
    fused = []  # calls of the fused head + loss (`Transformer.loss` imports it at call time)
    plain_lce = fused_loss.linear_cross_entropy
    fused_loss.linear_cross_entropy = lambda *a, **kw: (fused.append(1), plain_lce(*a, **kw))[1]
    # "<strategy>-ac": with per-block activation checkpointing (the single-process reference runs without it);
    # "<strategy>-prefix": prefix-LM batches; "<strategy>-docs": packed documents, each attending only within itself
    # "<strategy>-ul2": UL2's mixture of denoisers, decoder-only; "<strategy>-alibi": ALiBi position biases;
    # "<strategy>-encdec": a T5-style encoder-decoder (T5 bias buckets) on span corruption; "<strategy>-qknorm":
    # QK-norm; "<strategy>-glm": GLM blank infilling with 2D positions (each: also the single-process reference)
    strategy, prefix = strategy.removesuffix("-prefix"), strategy.endswith("-prefix")
    strategy, docs = strategy.removesuffix("-docs"), strategy.endswith("-docs")
    strategy, ul2 = strategy.removesuffix("-ul2"), strategy.endswith("-ul2")
    strategy, alibi = strategy.removesuffix("-alibi"), strategy.endswith("-alibi")
    strategy, encdec = strategy.removesuffix("-encdec"), strategy.endswith("-encdec")
    strategy, qknorm = strategy.removesuffix("-qknorm"), strategy.endswith("-qknorm")
    strategy, glm = strategy.removesuffix("-glm"), strategy.endswith("-glm")
    strategy, ac = strategy.removesuffix("-ac"), strategy.endswith("-ac")
    if strategy == "pp":  # one pipeline stage per rank; every rank reads the whole batch
        dist = PipelineDist()
    elif strategy == "pp+dp+tp":  # 3-D: 2 stages x 2 FSDP2 ranks x 2 tensor-parallel ranks
        dist = PipelineDist(dp=2, tp=2)
    else:
        dist = TorchDist(DistConfig(strategy=strategy, tp=2 if strategy == "fsdp+tp" else 1)) if strategy != "none" \
            else None
    rank, world = (dist.dp_rank, dist.dp_world) if dist else (0, 1)
    torch.manual_seed(0)
    vocab = special_vocab(64, 8) if ul2 or encdec or glm else 64  # [R], [S], [X] and 8 sentinels above the 64 ids
    extra = dict(pos="alibi") if alibi else dict(qk_norm=True) if qknorm else dict(block_pos=True) if glm else {}
    if encdec:  # T5-style: relative position buckets, the encoder reads the corrupted spans
        extra = dict(arch="encoder_decoder", pos="t5", n_encoder_layers=2)
    model = Transformer(ModelConfig(vocab_size=vocab, d_model=32, n_layers=3, n_heads=4, d_ff=64, tie_embeddings=False,
                                    **extra))
    ids = np.random.default_rng(0).integers(0, 64, 4000).astype(np.uint16)
    starts = np.arange(0, 4000, 11 if docs else 4000, dtype=np.int64)  # documents of 11 tokens: most rows hold 2-3
    ds = TokenDataset(arrays=[ids], doc_starts=starts, eos_id=0)
    # global batch 8 sequences: one process takes 8 per step, each of two ranks 4 (disjoint slices)
    # a pipeline step needs a micro-batch per stage at least (accumulation == one batch of 8)
    micro = {"pp": 4, "pp+dp+tp": 2}.get(strategy, 8 // world)
    loader = BatchLoader(ds, micro, 16, seed=0, rank=rank, world_size=world, doc_info=docs)
    if prefix:
        loader = PrefixLM(loader)
    if ul2:  # each row's noise is seeded by its window: a rank's or a micro-batch's rows are denoised as in one batch
        loader = DenoisingLoader(loader, "ul2", 64, n_sentinels=8, seed=0)
    if glm:  # every stage takes the 2D positions and the prefix lengths; the first embeds the block positions
        loader = DenoisingLoader(loader, "glm", 64, n_sentinels=8, seed=0, glm_gmask_prob=0.5)  # (uneven targets)
    if encdec:
        loader = DenoisingLoader(loader, "span_corruption", 64, n_sentinels=8, seed=0, encoder_decoder=True)
    # "-docs": a final validation on the same 8 sequences (one batch of 8, a pipeline's two of 4, or 4 on each of two
    # data-parallel ranks), each stage taking the document mask (equally many targets per batch)
    val = BatchLoader(ds, micro, 16, seed=1, rank=rank, world_size=world, doc_info=True) if docs else None
    if ul2:  # "-ul2": the same, UL2's batches (unevenly many targets per rank and batch: the loss weighs tokens)
        val = DenoisingLoader(BatchLoader(ds, micro, 16, seed=1, rank=rank, world_size=world), "ul2", 64, n_sentinels=8,
                              seed=1)
    cfg = TrainConfig(max_steps=4, micro_batch_size=micro, batch_size=8 // world, seq_len=16, lr=1e-2, warmup_steps=1,
                      progress=False, tensorboard=False, log_every=1, device="cpu", seed=0,
                      activation_checkpointing=ac, eval_batches=8 // (micro * world))
    losses, tokens = [], []
    trainer = Trainer(model, cfg, loader, out_dir=None, dist=dist, val_data=val,
                      hooks=[lambda tr, rec: (losses.append(rec["loss"]), tokens.append(rec["tokens"]))])
    final = trainer.fit(resume=False)
    sd = dist.model_state_dict(trainer.model) if strategy.startswith("pp") else full_state_dict(trainer.model)
    # the bytes of the parameters this rank holds (its local shards), and what the memory planner says they are
    local = sum(4 * (p.to_local() if hasattr(p, "to_local") else p).numel() for p in trainer.model.parameters())
    planned = estimate_memory(model.cfg, micro_batch=micro, seq_len=16, tp=2)["params"] \
        if strategy == "tp" and not encdec else None  # (the planner refuses encoder-decoder models)
    n_fused = torch.tensor(len(fused))
    if dist is not None:  # (a pipeline's head and loss live on its last stage)
        torch.distributed.all_reduce(n_fused)
    if (dist is None or dist.rank == 0):
        json.dump({"losses": losses, "tokens": tokens, "fused": int(n_fused), "val_loss": final.get("val_loss"),
                   "local_param_bytes": local, "planned_param_bytes": planned,
                   "params": {k: v.flatten()[:16].tolist() for k, v in sd.items()}}, open(out, "w"))
    if dist is not None:
        dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
