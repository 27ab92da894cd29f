#!/usr/bin/env bash
# Contrastive pre-training, then the vision encoder it trained into a VLM: CLIP from scratch on
# the embedded data, the quick start's LLM warm-up, and LLaVA stage 1 starting from the CLIP ViT.
#   bash examples/pretrain_clip.sh [--resume] [key=value ...]          overrides apply to every stage
#   torchrun --nproc_per_node 2 examples/pretrain_clip.sh [--resume] [key=value ...]
#   sbatch examples/slurm/pretrain_clip.sbatch [key=value ...]
# Defaults run on the embedded dataset on CPU (2 processes, TP=2): NPROC / GPUS set the processes
# per node; NNODES / NODE_RANK / MASTER_ADDR or Slurm variables the nodes (see examples/launch.sh).
# RECIPES replaces the stage list (e.g. RECIPES=examples/recipes/clip/siglip_debug_pretrain.yaml,
# or the clip_vit_l_14_336 / siglip_so400m_384 recipes alone on GPUs).
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
        (None, 'recipes/clip/clip_debug_pretrain.yaml'),
        (None, 'recipes/quickstart/llava_debug_stage0_lm.yaml'),
        (None, 'recipes/clip/llava_debug_stage1_from_clip.yaml'),
    ], replace_all='RECIPES'))
# end of the Python part
