#!/usr/bin/env bash
# LLaVA stage 3 (visual instruction tuning) from the stage-2 checkpoint named in the recipe.
#   GPUS=8 bash examples/finetune_llava.sh [--resume] [key=value ...]
# STAGE3 picks another recipe (default: LLaVA-1.5-7B full fine-tuning); node layout: see examples/launch.sh.
set -euo pipefail
# Preemption (SIGUSR1 / SIGTERM): the running stage saves a checkpoint and exits 0; do not start the next.
trap 'STOPPED=1' USR1 TERM
HERE=$(cd "$(dirname "$0")" && pwd)
STAGE3=${STAGE3:-$HERE/recipes/llava_1.5_7b_stage3.yaml}
bash "$HERE/launch.sh" "$STAGE3" "$@"
[ -z "${STOPPED:-}" ] || exit 0
