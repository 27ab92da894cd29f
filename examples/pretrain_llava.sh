#!/usr/bin/env bash
# LLaVA stages 1 (feature alignment) and 2 (multimodal pre-training), one after the other.
#   GPUS=8 bash examples/pretrain_llava.sh [--resume] [key=value ...]    (overrides apply to both stages)
#   torchrun --nproc_per_node 8 examples/pretrain_llava.sh [--resume] [key=value ...]
#   sbatch examples/slurm/pretrain_llava.sbatch [key=value ...]
# STAGE1 / STAGE2 pick other recipes (default: LLaVA-1.5-7B); node layout: see examples/launch.sh.
# Relative paths in the recipes resolve against WORKDIR (default: the repository).
#
# Why this file is both a bash script and a Python program: torchrun runs the file it is given
# with Python, while `bash` and Slurm run it with bash. Bash reads the block below and execs
# examples/launch.sh, which starts torchrun on this same file; Python sees that block as a string
# and runs the part after it in every worker: the stages in order, in-process, with the same recipes
# and overrides (megavlm/train.py run_example). Both commands run the same code.
''':'
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
exec bash "$HERE/launch.sh" "$HERE/$(basename "$0")" "$@"
: <<'# end of the Python part'
'''
import sys

from megavlm.train import run_example

# multiprocessing (dist-checkpoint writers) re-imports this file in its children: run only as __main__
if __name__ == "__main__":
    sys.exit(run_example(__file__, [
        ('STAGE1', 'recipes/llava_1.5_7b_stage1.yaml'),
        ('STAGE2', 'recipes/llava_1.5_7b_stage2.yaml'),
    ]))
# end of the Python part
