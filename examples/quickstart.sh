#!/usr/bin/env bash
# The quick start (README's main job): a small LLaVA (the debug flavor) on CPU, 2 processes with
# tensor parallelism 2, on the embedded dataset (generated into data/embedded on first use):
#   step 0  the LLM learns the captions' language from their text alone (it stands in for the
#           pretrained LLM nothing can download here; no image reaches it)
#   stage 1 feature alignment (connector), stage 2 pre-training (connector + LLM), stage 3
#           instruction tuning (connector + LLM, conversations and benchmark-style instructions)
# Each stage prints held-out caption token accuracy (and VQA exact match in stage 3) next to the
# same model's score on a blank image; stage 3 ends with the embedded benchmarks' table. Checkpoints and TensorBoard logs: outputs/quickstart/stage{0,1,2,3}.
#   bash examples/quickstart.sh [key=value ...]                    overrides apply to every stage
#   torchrun --nproc_per_node 2 examples/quickstart.sh [key=value ...]
# WORKDIR (default: the repository) is where data/ and outputs/ are written; outputs/quickstart is
# removed first (unless --resume).
#
# Why this file is both a bash script and a Python program: torchrun runs the file it is given
# with Python, while `bash` runs it with bash. Bash reads the block below (set-up, then torchrun on
# this same file); Python sees that block as a string and runs the part after it in every worker:
# the stages in order, in-process, with the same recipes and overrides (megavlm/train.py run_example).
''':'
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
bash "$REPO/tools/setup_env.sh"
PY="$REPO/.venv/bin/python"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
start=$(date +%s)
"$PY" -m torch.distributed.run --standalone --nproc_per_node "${NPROC:-2}" "$REPO/examples/quickstart.sh" "$@"
echo "quick start finished in $(( $(date +%s) - start )) s; final metrics: outputs/quickstart/stage3/final_metrics.json"
exit 0
: <<'# end of the Python part'
'''
import sys

from megavlm.train import run_example

# multiprocessing (dist-checkpoint writers) re-imports this file in its children: run only as __main__
if __name__ == "__main__":
    sys.exit(run_example(__file__, [(None, f"recipes/quickstart/{name}.yaml") for name in (
        "llava_debug_stage0_lm", "llava_debug_stage1", "llava_debug_stage2", "llava_debug_stage3")],
        fresh="outputs/quickstart"))
# end of the Python part
