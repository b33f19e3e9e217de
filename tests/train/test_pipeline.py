"""Pipeline parallelism (F2): 2 and 3 gloo stages under torchrun equal one process; the bubble formula."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmkit.model import ModelConfig, Transformer
from llmkit.train.pipeline import bubble_fraction, make_stage, pipeline_schedule, split_layers
from tests.train.test_distributed import _free_port

WORKER = Path(__file__).with_name("pp_worker.py")
REPO = Path(__file__).resolve().parents[2]


def _run(schedule: str, stages: int, micro: int, tmp: Path) -> dict:
    out = tmp / f"{schedule}_{stages}.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={stages}", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(WORKER), schedule, str(micro), str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("schedule,stages,micro", [("1f1b", 2, 4), ("gpipe", 3, 4)])
def test_pipeline_equals_one_process(schedule, stages, micro, tmp_path):
    r = _run(schedule, stages, micro, tmp_path)
    assert r["losses"] == pytest.approx(r["ref_losses"], abs=2e-5)
    assert r["ref_losses"][-1] < r["ref_losses"][0]  # the weights moved: the comparison has teeth
    assert r["max_param_diff"] < 2e-5
    assert r["stage_layers"] == [list(x) for x in split_layers(5, stages)]  # each stage trained its own blocks


def test_split_layers_and_bubble():
    assert split_layers(5, 2) == [range(0, 3), range(3, 5)]
    assert split_layers(8, 3) == [range(0, 3), range(3, 6), range(6, 8)]
    with pytest.raises(ValueError, match="cannot be split"):
        split_layers(2, 3)
    # GPipe's bubble: (p - 1) / (m + p - 1); 4 stages and 4 micro-batches idle 3/7 of the time, 32 only 3/35
    assert bubble_fraction(4, 4) == pytest.approx(3 / 7) and bubble_fraction(4, 32) == pytest.approx(3 / 35)
    assert bubble_fraction(1, 8) == 0.0


def test_stage_forwards_compose_to_the_whole_model():
    # in one process: stage 0's hidden states fed to stage 1 give the whole model's logits, bit for bit
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, d_ff=64, max_seq_len=32, pos="learned",
                      tie_embeddings=False, layer_types=["local", "global", "local"], sliding_window=4)
    full = Transformer(cfg)
    a, b = make_stage(copy.deepcopy(full), 0, 2), make_stage(copy.deepcopy(full), 1, 2)
    assert [blk.layer for blk in a.layers] == [0, 1] and [blk.layer for blk in b.layers] == [2]
    assert a.lm_head is None and b.embed is None
    x = torch.randint(0, 64, (2, 12))
    h = a(x)
    assert h.shape == (2, 12, 32)
    assert torch.equal(b(h), full(x))


def test_stage_refusals():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, tie_embeddings=True)
    with pytest.raises(ValueError, match="tied input/output embeddings"):
        make_stage(Transformer(cfg), 0, 2)
    with pytest.raises(ValueError, match="micro-batches never fill"):
        pipeline_schedule(Transformer(cfg), 0, 2, "cpu", 1)
    t5 = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, tie_embeddings=False, pos="t5")
    with pytest.raises(ValueError, match="T5 relative-position biases"):  # one table that every stage would copy
        make_stage(Transformer(t5), 1, 2)
    assert make_stage(Transformer(t5), 0, 1).t5_bias is not None  # (one stage holds every layer)


def test_trainer_refuses_what_a_pipeline_cannot_run():
    from llmkit.train.trainer import Trainer
    from tests.train.conftest import tiny_model, train_cfg

    class Stage:  # the Trainer's test of a pipeline `dist` is its pipeline_step
        pipeline_step, rank, world_size, device = None, 0, 1, torch.device("cpu")

    for kw in (dict(dtype="fp16"), dict(compile=True)):
        with pytest.raises(ValueError, match="pipeline parallelism"):
            Trainer(tiny_model(tie_embeddings=False), train_cfg(**kw), iter(()), dist=Stage())
    with pytest.raises(ValueError, match="no custom loss_fn"):
        Trainer(tiny_model(tie_embeddings=False), train_cfg(), iter(()), dist=Stage(), loss_fn=lambda m, b: None)
