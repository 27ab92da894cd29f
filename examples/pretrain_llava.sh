#!/usr/bin/env bash
# LLaVA stages 1 (feature alignment) and 2 (multimodal pre-training), one after the other.
#   GPUS=8 bash examples/pretrain_llava.sh [key=value ...]        (overrides apply to both stages)
# STAGE1 / STAGE2 pick other recipes (default: LLaVA-1.5-7B); node layout: see examples/launch.sh.
set -euo pipefail
# Preemption (SIGUSR1 / SIGTERM): the running stage saves a checkpoint and exits 0; do not start the next.
trap 'STOPPED=1' USR1 TERM
HERE=$(cd "$(dirname "$0")" && pwd)
STAGE1=${STAGE1:-$HERE/recipes/llava_1.5_7b_stage1.yaml}
STAGE2=${STAGE2:-$HERE/recipes/llava_1.5_7b_stage2.yaml}
bash "$HERE/launch.sh" "$STAGE1" "$@"
[ -z "${STOPPED:-}" ] || exit 0
bash "$HERE/launch.sh" "$STAGE2" "$@"
[ -z "${STOPPED:-}" ] || exit 0
