"""The GPU checks that a session with a CUDA GPU runs in one go (bench/gpu_check.sh): their code paths on CPU."""
import argparse
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def test_gpu_bench_runs_on_cpu(capsys):
    spec = importlib.util.spec_from_file_location("bench_pretrain", REPO / "bench" / "pretrain.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = argparse.Namespace(gpu_device="cpu", gpu_seq=32, gpu_batch="1,2", gpu_vocab=256, gpu_layers=1,
                              gpu_warmup=1, gpu_steps=2, no_compile=True, gpu_profile=1)
    out = bench.gpu(args)
    assert [r["batch"] for r in out] == [1, 2]
    for r in out:
        assert r["tok_s"] > 0 and math.isfinite(r["mfu_measured"]) and 0 < r["mfu_measured"]
        assert r["flops_per_token"] > 6 * r["params"] * 0.5
    printed = capsys.readouterr().out
    assert printed.count("gpu: B=") == 2 and printed.count("gpu: profile of 1 steps") == 2
    assert "aten::mm" in printed or "aten::addmm" in printed  # the profile table names the matmuls


def test_gpu_check_script_parses_and_refuses_without_cuda(tmp_path):
    script = REPO / "bench" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    if not torch.cuda.is_available():  # it stops before the tests, which would only skip
        r = subprocess.run(["bash", str(script)], env={"OUT": str(tmp_path), "PYTHON": sys.executable,
                                                       "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
        assert r.returncode != 0 and "no CUDA device visible" in r.stderr
