#!/usr/bin/env bash
# Flamingo pre-training: step 0 (the text LLM, on the embedded data only: it stands in for a
# downloaded pretrained LLM) then multimodal pre-training (resampler + gated cross-attention).
#   bash examples/pretrain_flamingo.sh [--resume] [key=value ...]        overrides apply to both runs
#   torchrun --nproc_per_node 2 examples/pretrain_flamingo.sh [--resume] [key=value ...]
#   sbatch examples/slurm/pretrain_flamingo.sbatch [key=value ...]
# Defaults run on the embedded dataset on CPU (2 processes: TP=2, then PP=2). NPROC / GPUS set the
# processes per node; NNODES / NODE_RANK / MASTER_ADDR or Slurm variables the nodes (launch.sh).
# RECIPE=examples/recipes/flamingo/flamingo_idefics_9b_pretrain.yaml runs only that recipe (its
# LLM comes from HF), LM_RECIPE another step-0 recipe. WORKDIR: where data/ and outputs/ go.
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
        ('LM_RECIPE', 'recipes/flamingo/flamingo_debug_lm.yaml'),
        (None, 'recipes/flamingo/flamingo_debug_pretrain.yaml'),
    ], replace_all='RECIPE'))
# end of the Python part
