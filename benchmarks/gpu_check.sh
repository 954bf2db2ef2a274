#!/usr/bin/env bash
# The GPU checks of issue 11 as ONE command for the device tool (an H100/H200 session has 15 minutes
# of device time, a machine start included): the CUDA tests (AMP, compiled steps, CUDA graphs of
# training chunks), training throughput of ours (TC, batch 180, fp32 / AMP, eager / compiled / CUDA
# graphs) next to the public code, and evaluation throughput (compiled, environment workers, CUDA graphs).
# Results land in $OUT. Not yet run: the part limits (100 + 300 + 90 s) are estimates; both
# benchmarks rewrite their JSON after every measurement, so a part stopped by its limit keeps what
# it measured (train_throughput: the public code first, then ours eager, graphs, compiled, both;
# fp32 before AMP).
#
# Before, on this machine (the GPU machine has no minigrid and no internet; ../shared does not travel):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     minigrid==3.2.0 gymnasium==1.4.0 farama-notifications==0.0.6 pygame-ce==2.5.8
#   cp -r ../shared/baselines/public_tc .whl/public_tc
# Then: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
# Each part has its own time limit, so that one slow part leaves the others their turn.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" SDL_AUDIODRIVER=dummy PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -20 | tee "$OUT/cuda_tests.txt"

timeout 300 python3 benchmarks/train_throughput.py --device cuda --agents tc --batches 180 --updates 3 --warmup 3 \
  --episodes 400 --compile none,default --cuda-graphs --public "$PWD/.whl/public_tc/bench_public.py" \
  --out "$OUT/train_throughput_cuda.json" 2>&1 | tail -12
pkill -f "benchmarks/train_throughput.py" || true  # a measurement process left by the limit would hold the GPU

timeout 90 python3 benchmarks/eval_throughput.py --device cuda --params params-gpu.yaml --level BabyAI-BossLevel-v0 --modes tc oracle \
  --batch-sizes 64 --threads 1 --episodes 64 --max-steps 32 --repeats 2 --workers 8 --compile default --cuda-graphs \
  --out "$OUT/eval_throughput_cuda.json" 2>&1 | grep -v Warning | tail -12
