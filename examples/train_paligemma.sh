#!/usr/bin/env bash
# PaliGemma end to end in one stage: SigLIP, the projector and Gemma train together, prefix-LM attention.
#   bash examples/train_paligemma.sh [--resume] [key=value ...]        overrides apply to every stage
#   torchrun --nproc_per_node 2 examples/train_paligemma.sh [--resume] [key=value ...]
# Defaults run the debug flavor on the embedded dataset on CPU (2 processes, TP=2). NPROC / GPUS set the
# processes per node; NNODES / NODE_RANK / MASTER_ADDR or Slurm variables the nodes (launch.sh).
# RECIPES="a.yaml b.yaml" runs those instead, e.g. paligemma_3b_224_stage{1,2}.yaml (SigLIP frozen for the
# first epoch, then everything) or paligemma_3b_224_transfer.yaml (fine-tuning the released model).
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
        (None, 'recipes/paligemma/paligemma_debug.yaml'),
    ], replace_all='RECIPES'))
# end of the Python part
