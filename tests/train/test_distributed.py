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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(strategy: str, tmp: Path, nproc: int, ckpt: bool = False):
    out = tmp / strategy.replace("+", "_")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(WORKER), strategy, str(out)]
    if ckpt:
        cmd.append(str(tmp / f"dcp_{strategy.replace('+', '_')}"))
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), strategy, str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
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
        assert torch.allclose(params[k], ref_params[k], atol=2e-5), k


@pytest.mark.slow
def test_fsdp2_composed_with_tp_on_a_2x2_mesh(single, tmp_path):
    ref_losses, ref_params = single
    losses, params = _run("fsdp+tp", tmp_path, 4, ckpt=True)
    assert losses == pytest.approx(ref_losses, abs=2e-5)
    for k in ref_params:
        assert torch.allclose(params[k], ref_params[k], atol=2e-5), k


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_trainer_under_torchrun_equals_single_process(strategy, tmp_path):
    """The one Trainer with TorchDist: same global batch -> same losses and parameters as one process."""
    worker = Path(__file__).with_name("dist_trainer_worker.py")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single.json"
    res = subprocess.run([sys.executable, str(worker), "none", str(single)], env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    multi = tmp_path / "multi.json"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                          f"--master_port={_free_port()}", str(worker), strategy, str(multi)],
                         env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = json.loads(single.read_text()), json.loads(multi.read_text())
    assert len(a["losses"]) == 4
    assert b["losses"] == pytest.approx(a["losses"], abs=2e-5)
    for k in a["params"]:
        assert b["params"][k] == pytest.approx(a["params"][k], abs=2e-5), k
