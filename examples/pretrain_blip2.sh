#!/usr/bin/env bash
# BLIP-2 pre-training: stage 1 (Q-Former: ITC + ITM + ITG) then stage 2 (generative, LM loss).
#   bash examples/pretrain_blip2.sh [key=value ...]          overrides apply to both stages
# Defaults run on the embedded dataset on CPU (2 processes, TP=2): NPROC / GPUS set the processes
# per node; NNODES / NODE_RANK / MASTER_ADDR or Slurm variables the nodes (see examples/launch.sh).
# STAGE1 / STAGE2 pick other recipes (e.g. examples/recipes/blip2/blip2_opt_2.7b_stage{1,2}.yaml).
set -euo pipefail
# Preemption (SIGUSR1 / SIGTERM): the running stage saves a checkpoint and exits 0; do not start the next.
trap 'STOPPED=1' USR1 TERM
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
[ -x "$REPO/.venv/bin/python" ] || bash "$REPO/tools/setup_env.sh"
STAGE1=${STAGE1:-$HERE/recipes/blip2/blip2_debug_stage1.yaml}
STAGE2=${STAGE2:-$HERE/recipes/blip2/blip2_debug_stage2.yaml}
export GPUS=${GPUS:-${NPROC:-2}}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
cd "${WORKDIR:-$REPO}"
bash "$HERE/launch.sh" "$STAGE1" "$@"
[ -z "${STOPPED:-}" ] || exit 0
bash "$HERE/launch.sh" "$STAGE2" "$@"
[ -z "${STOPPED:-}" ] || exit 0
