#!/usr/bin/env bash
# InternVL's three stages: MLP warm-up -> ViT incremental training -> full SFT, on tiled images.
#   bash examples/train_internvl.sh [key=value ...]        overrides apply to every stage
# Defaults run the debug flavor on the embedded dataset on CPU (2 processes, TP=2), after a short
# text step that stands in for the pretrained Qwen2 the debug flavor lacks. NPROC / GPUS set the
# processes per node; NNODES / NODE_RANK / MASTER_ADDR or Slurm variables the nodes (launch.sh).
# RECIPES="a.yaml b.yaml c.yaml" runs those instead, e.g. the internvl3_1b_stage{1,2,3}.yaml set.
set -euo pipefail
# Preemption (SIGUSR1 / SIGTERM): the running stage saves a checkpoint and exits 0; do not start the next.
trap 'STOPPED=1' USR1 TERM
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
[ -x "$REPO/.venv/bin/python" ] || bash "$REPO/tools/setup_env.sh"
export GPUS=${GPUS:-${NPROC:-2}}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
cd "${WORKDIR:-$REPO}"
R=$HERE/recipes/internvl
for recipe in ${RECIPES:-$R/internvl_debug_lm.yaml $R/internvl_debug_stage1.yaml $R/internvl_debug_stage2.yaml $R/internvl_debug_stage3.yaml}; do
  bash "$HERE/launch.sh" "$recipe" "$@"
  [ -z "${STOPPED:-}" ] || exit 0
done
