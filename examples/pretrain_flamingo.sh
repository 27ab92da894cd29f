#!/usr/bin/env bash
# Flamingo pre-training: step 0 (the text LLM, on the embedded data only: it stands in for a
# downloaded pretrained LLM) then multimodal pre-training (resampler + gated cross-attention).
#   bash examples/pretrain_flamingo.sh [key=value ...]        overrides apply to both runs
# Defaults run on the embedded dataset on CPU (2 processes: TP=2, then PP=2). NPROC / GPUS set the
# processes per node; NNODES / NODE_RANK / MASTER_ADDR or Slurm variables the nodes (launch.sh).
# RECIPE=examples/recipes/flamingo/flamingo_idefics_9b_pretrain.yaml runs only that recipe (its
# LLM comes from HF), LM_RECIPE another step-0 recipe.
set -euo pipefail
# Preemption (SIGUSR1 / SIGTERM): the running stage saves a checkpoint and exits 0; do not start the next.
trap 'STOPPED=1' USR1 TERM
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
[ -x "$REPO/.venv/bin/python" ] || bash "$REPO/tools/setup_env.sh"
export GPUS=${GPUS:-${NPROC:-2}}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
cd "${WORKDIR:-$REPO}"
if [ -n "${RECIPE:-}" ]; then
  exec bash "$HERE/launch.sh" "$RECIPE" "$@"
fi
bash "$HERE/launch.sh" "${LM_RECIPE:-$HERE/recipes/flamingo/flamingo_debug_lm.yaml}" "$@"
[ -z "${STOPPED:-}" ] || exit 0
bash "$HERE/launch.sh" "$HERE/recipes/flamingo/flamingo_debug_pretrain.yaml" "$@"
[ -z "${STOPPED:-}" ] || exit 0
