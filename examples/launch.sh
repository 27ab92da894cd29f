#!/usr/bin/env bash
# torchrun wrapper shared by the launch scripts: one call per node.
#   bash examples/launch.sh RECIPE [--resume] [key=value ...]       one stage (python -m megavlm.train)
#   bash examples/launch.sh examples/X.sh [--resume] [key=value ...]  X's stages, X run by torchrun
# Node layout from the environment, else from Slurm (one task per node under srun), else one node:
#   GPUS         processes on this node   (default: visible GPUs, or 1 without GPUs)
#   NNODES       nodes                    (default: SLURM_NNODES or 1)
#   NODE_RANK    this node's index        (default: SLURM_NODEID or 0)
#   MASTER_ADDR  rendezvous host          (default: first host of SLURM_JOB_NODELIST, or localhost)
#   MASTER_PORT  rendezvous port          (default: 29500)
#   MAX_RESTARTS torchrun restarts after a worker fails (default: 0); a restarted job resumes from
#                the latest complete checkpoint by itself
# Preemption: SIGUSR1 (Slurm's --signal=USR1@120) or SIGTERM reaching this script is passed on to
# the workers, which finish their step, save a checkpoint and exit 0. torchrun itself keeps both
# ignored (it would die of SIGUSR1, and give its workers only 30 s after a SIGTERM), also when
# Slurm signals every process of the job step.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
[ -x "$PY" ] || PY=python3

if [ -z "${GPUS:-}" ]; then
  GPUS=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [ "${GPUS:-0}" -gt 0 ] || GPUS=1
fi
NNODES=${NNODES:-${SLURM_NNODES:-1}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
if [ -z "${MASTER_ADDR:-}" ]; then
  if [ -n "${SLURM_JOB_NODELIST:-}" ] && command -v scontrol >/dev/null; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  elif [ -n "${SLURM_JOB_NODELIST:-}" ]; then  # "gpu[003-004,010],cpu1" -> "gpu003"
    MASTER_ADDR=$(echo "$SLURM_JOB_NODELIST" | sed -E 's/^([^,[]+)(\[([^],-]+)[^]]*\])?.*/\1\3/')
  else
    MASTER_ADDR=localhost
  fi
fi
MASTER_PORT=${MASTER_PORT:-29500}
# torchrun sets RANK/WORLD_SIZE for its children; drop Slurm's per-task ranks so they do not compete.
unset SLURM_PROCID SLURM_NTASKS SLURM_LOCALID

case "${1:-}" in
  *.yaml|*.yml) PROGRAM=(-m megavlm.train) ;;
  *) PROGRAM=("$1"); shift ;;   # a launcher that is also a Python program (examples/*.sh)
esac

echo "megavlm: node ${NODE_RANK}/${NNODES}, ${GPUS} processes, master ${MASTER_ADDR}:${MASTER_PORT}: ${PROGRAM[*]} $*"
RUN=
forward() { [ -z "$RUN" ] || pkill "-$1" -P "$RUN" 2>/dev/null || true; }  # torchrun's children: the workers
trap 'forward USR1' USR1
trap 'forward TERM' TERM
( trap '' USR1 TERM
  exec "$PY" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --max-restarts "${MAX_RESTARTS:-0}" \
    --signals-to-handle SIGINT,SIGHUP,SIGQUIT "${PROGRAM[@]}" "$@" ) &
RUN=$!
while true; do
  status=0
  wait "$RUN" || status=$?
  kill -0 "$RUN" 2>/dev/null || exit "$status"  # else wait was interrupted by a signal: keep waiting
done
