#!/usr/bin/env bash
# The GPU checks of the pre-training issue in one run, for a machine with a CUDA GPU (about 4-6 minutes):
#   bash bench/gpu_check.sh        # from anywhere; logs go to $OUT (or ./gpu_check_out)
# 1. the CUDA tests (tests/train/test_trainer.py -k cuda): fp32 (TF32), bf16 and fp16 training against CPU
#    fp32, GLM batches (prefix masks, 2D positions) in fp32 and bf16 against CPU fp32, fp16's loss-scale skip and
#    resume, torch.compile against eager;
# 2. GPT-2-124M bf16 throughput and MFU with torch.compile (bench/pretrain.py --only gpu; target >= 45% on
#    an H100/H200).
# It installs nothing: it runs on the python3 that holds a CUDA build of torch ($PYTHON to choose another).
# The training path needs torch, numpy, safetensors, pyyaml and tqdm; the tests need pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check_out}
mkdir -p "$out"
py=${PYTHON:-python3}
# LLMKIT_NATIVE=0: the CPU reference runs take torch's own ops rather than first compiling llmkit's float32 CPU
# kernels (CI tests those); nothing on the CUDA path uses them.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LLMKIT_TEST_THREADS=4 LLMKIT_NATIVE=0

nvidia-smi 2>&1 | tee "$out/nvidia-smi.txt"
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)
assert torch.cuda.is_available(), 'no CUDA device visible to torch: the CUDA tests would only skip'" || exit 1
timeout 270 $py -m pytest -q -rs tests/train/test_trainer.py -k cuda 2>&1 | tee "$out/cuda_tests.log"
tests=$?
timeout 300 $py bench/pretrain.py --only gpu 2>&1 | tee "$out/gpu_bench.log"
bench=$?
echo "gpu_check: cuda tests rc=$tests, gpu bench rc=$bench"
exit $((tests || bench))
