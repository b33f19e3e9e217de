"""DDP, FSDP2 and tensor parallelism on 2 CPU processes (gloo, launched by torchrun) equal one process (F1-F3)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("dist_worker.py")
REPO = Path(__file__).resolve().parents[2]
STATE_BYTES: dict = {}  # (strategy, processes) -> the AdamW state bytes each rank held
# AdamW moves a weight by ~lr * m / sqrt(v) whatever the gradient's size, so on weights whose gradient is tiny a
# float32 rounding difference (TP's half-width matmuls sum in another order) shows at ~lr * 1e-3: 2.3e-5 measured
# with MKL on an AMD EPYC host (lr = 1e-2, 3 steps). A wrong or missing gradient moves weights by ~lr.
PARAM_ATOL = 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(strategy: str, tmp: Path, nproc: int, ckpt: bool = False, expect_fail: bool = False):
    out = tmp / strategy.replace("+", "_")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(WORKER), strategy, str(out)]
    if ckpt:
        cmd.append(str(tmp / f"dcp_{strategy.replace('+', '_')}"))
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), strategy, str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    if expect_fail:
        assert res.returncode != 0
        return res.stderr
    assert res.returncode == 0, res.stderr[-3000:]
    STATE_BYTES[(strategy, nproc)] = json.loads(Path(str(out) + ".state_bytes.json").read_text())
    return json.loads(Path(str(out) + ".json").read_text()), load_file(str(out) + ".safetensors")



@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _run("none", tmp_path_factory.mktemp("single"), 1)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "tp"])
def test_two_processes_equal_one(strategy, single, tmp_path):
    ref_losses, ref_params = single
    losses, params = _run(strategy, tmp_path, 2, ckpt=strategy != "ddp")
    assert losses == pytest.approx(ref_losses, abs=2e-5)
    assert set(params) == set(ref_params)
    for k in ref_params:
        assert torch.allclose(params[k], ref_params[k], atol=PARAM_ATOL), k
    # optimizer state per rank: DDP replicates it; FSDP2 (ZeRO-3) and TP hold about 1/2 each
    (full,), per_rank = STATE_BYTES[("none", 1)], STATE_BYTES[(strategy, 2)]
    if strategy == "ddp":
        assert per_rank == [full, full]
    elif strategy == "fsdp":  # every tensor sharded (dim-0 padding aside)
        assert sum(per_rank) >= full and all(b <= 0.51 * full for b in per_rank), (per_rank, full)
    else:  # TP shards the block matrices; embeddings, head and norms stay whole on each rank
        assert sum(per_rank) > full and all(b < 0.6 * full for b in per_rank), (per_rank, full)


def test_fsdp2_cpu_offload_on_a_cpu_mesh_is_a_clear_error(tmp_path):
    # CPUOffloadPolicy needs an accelerator to offload from; torch's own error comes from deep inside fully_shard
    err = _run("fsdp-offload", tmp_path, 2, expect_fail=True)
    assert "cpu_offload moves shards from an accelerator" in err


@pytest.mark.slow
def test_fsdp2_composed_with_tp_on_a_2x2_mesh(single, tmp_path):
    ref_losses, ref_params = single
    losses, params = _run("fsdp+tp", tmp_path, 4, ckpt=True)
    assert losses == pytest.approx(ref_losses, abs=2e-5)
    for k in ref_params:
        assert torch.allclose(params[k], ref_params[k], atol=PARAM_ATOL), k


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "tp", "pp", "fsdp+tp", "pp+dp+tp", "fsdp-ac", "pp-prefix",
                                      "pp-docs", "fsdp-ul2", "pp+dp+tp-ul2", "tp-alibi", "fsdp+tp-encdec",
                                      "tp-qknorm", "pp+dp+tp-qknorm", "pp+dp+tp-glm"])
def test_trainer_under_torchrun_equals_single_process(strategy, tmp_path):
    """The one Trainer with TorchDist: same global batch -> same losses, parameters and token counts as one
    process (TP ranks share their batch: tokens are counted per data-parallel rank). "-prefix": prefix-LM batches
    (every stage takes the prefix lengths, and the pipeline's micro-batches, unevenly masked, are weighted by their
    target tokens); "-docs": packed documents (every stage takes the document mask and positions); "-ul2": UL2's
    denoisers on a decoder-only model (rows padded to the window; ranks and micro-batches denoise a row alike);
    "-alibi": ALiBi biases (each TP rank keeps its heads' slopes); "-encdec": a T5-style encoder-decoder on span
    corruption (TP splits the encoder's blocks, cross-attention and the T5 bias table by heads too); "-qknorm":
    QK-norm, whose weights every TP rank holds whole but trains from its own heads (their gradients are summed);
    "-glm": GLM blank infilling (shuffled spans after a bidirectional Part A, 2D positions: every stage reads the
    positions and prefix lengths, the first stage embeds the block positions).
    Under TP the rank's parameter shards also weigh what the memory planner (`estimate_memory(tp=2)`) says."""
    worker = Path(__file__).with_name("dist_trainer_worker.py")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single.json"
    suffixes = ("-prefix", "-docs", "-ul2", "-alibi", "-encdec", "-qknorm", "-glm")
    suffix = next((s for s in suffixes if strategy.endswith(s)), "")
    ref = "none" + suffix
    res = subprocess.run([sys.executable, str(worker), ref, str(single)], env=env, capture_output=True, text=True,
                         timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    multi = tmp_path / "multi.json"
    # the 2 x 2 mesh (dp, tp), the 2 x 2 x 2 mesh (pp, dp, tp); "-ac": activation checkpointing
    nproc = {"fsdp+tp": 4, "pp+dp+tp": 8}.get(strategy.removesuffix(suffix), 2)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                          "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(worker), strategy, str(multi)],
                         env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = json.loads(single.read_text()), json.loads(multi.read_text())
    assert len(a["losses"]) == 4
    assert b["losses"] == pytest.approx(a["losses"], abs=2e-5)
    assert b["tokens"] == a["tokens"]
    assert (b["planned_param_bytes"] is not None) == (strategy.removesuffix(suffix) == "tp")
    if strategy.removesuffix(suffix) == "tp":  # (plain, ALiBi, QK-norm: norms whole on every rank)
        assert b["local_param_bytes"] == b["planned_param_bytes"] < a["local_param_bytes"]
    if suffix != "-encdec":  # (an encoder-decoder counts its decoder's tokens, the corrupted spans' targets)
        assert a["tokens"] == [8 * 16 * (i + 1) for i in range(4)]
    assert (a["val_loss"] is not None) == strategy.endswith(("-docs", "-ul2"))
    assert b["val_loss"] == pytest.approx(a["val_loss"], abs=2e-5)
    # the model's forward fuses the head with the loss in every layout: DDP, FSDP2, TP and a pipeline's last stage
    assert a["fused"] > 0 and b["fused"] > 0, (a["fused"], b["fused"])
    for k in a["params"]:
        assert b["params"][k] == pytest.approx(a["params"][k], abs=2e-5), k


def _torchrun_pretrain(recipe: Path, out: Path, strategy: str, *extra: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "LLMKIT_DIST": strategy}
    nproc = 2
    if strategy == "pp+dp+tp":  # 2 stages x 2 data-parallel ranks x 2 tensor-parallel ranks
        env.update(LLMKIT_DIST="pp", LLMKIT_DP="2", LLMKIT_TP="2")
        nproc = 8
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                          "--master_addr=127.0.0.1",
                          f"--master_port={_free_port()}", "-m", "llmkit", "pretrain", "--config", str(recipe),
                          "--out", str(out), *extra], env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]


def _step_losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "tp", "pp", "pp+dp+tp", "pp-ul2"])
def test_pretrain_cli_under_torchrun(strategy, tmp_path):
    """`torchrun -m llmkit pretrain` (DDP, FSDP2 on disjoint rank slices; TP and a 2-stage pipeline on the same
    batches; 2 stages x 2 FSDP2 ranks x 2 TP ranks) writes one llmkit run directory; sharded (FSDP2, TP) and per-stage optimizer state is gathered
    into the checkpoint, and a resume from it continues with the same losses as the uninterrupted run. "pp-ul2": the
    pipeline trains UL2's mixture of denoisers (a decoder-only recipe; [R]/[S]/[X] and sentinels above the
    tokenizer's ids)."""
    import shutil

    strategy, ul2 = strategy.removesuffix("-ul2"), strategy.endswith("-ul2")

    (tmp_path / "corpus.txt").write_text("to be or not to be, that is the question. " * 300)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: {preset: t3-llama, vocab_size: auto, d_model: 32, n_layers: 2, n_heads: 4, max_seq_len: 64}\n"
        f"data: {{kind: text, path: {tmp_path / 'corpus.txt'}, val_fraction: 0.1, tokenizer: char"
        + (", objective: ul2, n_sentinels: 16" if ul2 else "") + "}\n"
        "train: {max_steps: 6, micro_batch_size: 4, seq_len: 32, lr: 0.003, warmup_steps: 1, progress: false,"
        " tensorboard: false, log_every: 1, device: cpu, eval_batches: 2, ckpt_every: 3}\n")
    extra = ["train.batch_size=8"] if strategy.startswith("pp") else []  # two micro-batches of 4: one per stage
    _torchrun_pretrain(recipe, tmp_path / "run", strategy, *extra)
    full = _step_losses(tmp_path / "run")
    losses = list(full.values())
    assert len(losses) >= 6 and losses[-1] < losses[0]
    if strategy != "ddp":
        from safetensors.torch import load_file as load_st

        from llmkit.train.checkpoint import list_checkpoints

        ckpts = list_checkpoints(tmp_path / "run" / "checkpoints")
        opt = load_st(str(ckpts[0] / "optimizer.safetensors"))
        assert any(k.endswith("exp_avg_sq") for k in opt) and all(v.dim() == 0 or v.shape[0] > 0 for v in opt.values())
        shutil.rmtree(ckpts[-1])  # drop step 6: resume from step 3's gathered model + optimizer state
        _torchrun_pretrain(recipe, tmp_path / "run", strategy, *extra, "--resume")
        resumed = _step_losses(tmp_path / "run")
        assert max(resumed) == 6
        for step in range(4, 7):
            assert resumed[step] == pytest.approx(full[step], abs=1e-5), step
    import llmkit
    from llmkit.train.checkpoint import latest_checkpoint

    model, tok = llmkit.load(latest_checkpoint(tmp_path / "run" / "checkpoints"))  # full weights gathered by rank 0
    assert model(torch.tensor([tok.encode("to be")])).shape[-1] == tok.vocab_size + (3 + 16 if ul2 else 0)
