#!/usr/bin/env bash
# Throughput comparison on a lent H100/H200, short enough to run twice in a few minutes:
#   ours vs HF eager vs HF + torch.compile (bf16), + ours in FP8 when Transformer Engine is
#   installed (setup_gpu_env.sh installs it from the carried parts), stage 1 and 2,
#   llava-1b at batch 8 x 2048; tokens/s and MFU count real tokens (add --fill 0.8 for padded
#   rows: the table shows the padding share). Prepare on the CPU machine: bash tools/gpu/fetch_wheels.sh
#   (tools/gpu/verify_all.sh runs this comparison and every other GPU check in one call)
#   run: bash tools/gpu/bench_throughput.sh [extra benchmark_throughput.py arguments]
set -euo pipefail
cd "$(dirname "$0")/../.."
ENV_LINE=$(bash tools/gpu/setup_gpu_env.sh)
eval "$ENV_LINE"
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
python tools/gpu/llava_smoke.py 2>&1 | tail -3          # correctness on the card first
STEPS=${STEPS:-8}
python tools/benchmark_throughput.py --flavor llava-1b --batch 8 --seq 2048 --steps "$STEPS" --warmup 3 \
  --override kernels.cross_entropy=triton --override kernels.connector=triton "$@" | tee "${OUT:-.}/throughput.txt"
