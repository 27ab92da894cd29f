#!/usr/bin/env bash
# InternVL's three stages: MLP warm-up -> ViT incremental training -> full SFT, on tiled images.
#   bash examples/train_internvl.sh [--resume] [key=value ...]        overrides apply to every stage
#   torchrun --nproc_per_node 2 examples/train_internvl.sh [--resume] [key=value ...]
# Defaults run the debug flavor on the embedded dataset on CPU (2 processes, TP=2), after a short
# text step that stands in for the pretrained Qwen2 the debug flavor lacks. NPROC / GPUS set the
# processes per node; NNODES / NODE_RANK / MASTER_ADDR or Slurm variables the nodes (launch.sh).
# RECIPES="a.yaml b.yaml c.yaml" runs those instead, e.g. the internvl3_1b_stage{1,2,3}.yaml set.
# WORKDIR (default: the repository) is where data/ and outputs/ are written.
#
# Why this file is both a bash script and a Python program: torchrun runs the file it is given
# with Python, while `bash` and Slurm run it with bash. Bash reads the block below and execs
# examples/launch.sh, which starts torchrun on this same file; Python sees that block as a string
# and runs the part after it in every worker: the stages in order, in-process, with the same recipes
# and overrides (megavlm/train.py run_example). Both commands run the same code.
''':'
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
[ -x "$REPO/.venv/bin/python" ] || [ -n "${PYTHON:-}" ] || bash "$REPO/tools/setup_env.sh"
export GPUS=${GPUS:-${NPROC:-2}}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec bash "$HERE/launch.sh" "$HERE/$(basename "$0")" "$@"
: <<'# end of the Python part'
'''
import sys

from megavlm.train import run_example

# multiprocessing (dist-checkpoint writers) re-imports this file in its children: run only as __main__
if __name__ == "__main__":
    sys.exit(run_example(__file__, [
        (None, 'recipes/internvl/internvl_debug_lm.yaml'),
        (None, 'recipes/internvl/internvl_debug_stage1.yaml'),
        (None, 'recipes/internvl/internvl_debug_stage2.yaml'),
        (None, 'recipes/internvl/internvl_debug_stage3.yaml'),
    ], replace_all='RECIPES'))
# end of the Python part
