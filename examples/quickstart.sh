#!/usr/bin/env bash
# The quick start (README's main job): three LLaVA stages on the debug flavor, on CPU, 2 processes
# with tensor parallelism 2, on the embedded dataset (generated into data/embedded on first use).
# Prints held-out caption token accuracy and VQA exact match, each next to the same model's score
# on a blank image. Checkpoints and TensorBoard logs go to outputs/quickstart/stage{1,2,3}.
# Extra arguments are recipe overrides applied to every stage, e.g. train.max_steps=20.
# WORKDIR (default: the repository) is where data/ and outputs/ are written.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
bash "$REPO/tools/setup_env.sh"
PY="$REPO/.venv/bin/python"
cd "${WORKDIR:-$REPO}"
NPROC=${NPROC:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
rm -rf outputs/quickstart
start=$(date +%s)
for stage in 1 2 3; do
  echo "=== stage ${stage} ==="
  "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m megavlm.train \
    "$REPO/examples/recipes/quickstart/llava_debug_stage${stage}.yaml" "$@"
done
echo "quick start finished in $(( $(date +%s) - start )) s; final metrics: outputs/quickstart/stage3/final_metrics.json"
