"""Train one stage from a recipe (under torchrun or srun).

    torchrun --nproc_per_node 2 -m megavlm.train examples/recipes/quickstart/llava_debug_stage1.yaml \
        [--resume] [key=value ...]

Exit status: 0 when the stage finished or stopped early with a checkpoint (SIGTERM / SIGUSR1,
train.exit_duration_minutes, train.exit_at_step: continue with --resume); 2 for a stop the user
must act on (bad recipe, missing file, bad data past the skip budget, template mismatch, broken
checkpoint), printed as one message on rank 0 with no traceback. Under ``torchrun --max-restarts``
a restarted worker resumes from the latest complete checkpoint by itself.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings


def _quiet() -> None:
    """megatron-core warns about missing GPU extensions and CUDA settings on every rank; keep the
    console for the run's own output (rank 0) and for errors."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    warnings.filterwarnings("ignore", module=r"megatron\..*")
    warnings.filterwarnings("ignore", module=r"megavlm\.parallel\.cpu_compat")
    warnings.filterwarnings("ignore", category=FutureWarning)
    if rank != 0:
        warnings.simplefilter("ignore")
    logging.basicConfig(level=logging.WARNING if rank == 0 else logging.ERROR,
                        format=f"[rank{rank}] %(levelname)s %(name)s: %(message)s")


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))


def _user_errors() -> tuple[type, ...]:
    """Stops with a cause the user must fix; anything else is a bug and keeps its traceback."""
    from megavlm.config.schema import ConfigError
    from megavlm.data.loader import SkipBudgetExceeded
    from megavlm.parallel.init import ParallelLayoutError
    from megavlm.training.checkpoint import CheckpointError
    from megavlm.training.resilience import RunStop

    return ConfigError, FileNotFoundError, ParallelLayoutError, SkipBudgetExceeded, CheckpointError, RunStop


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="YAML recipe (examples/recipes/...)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=10")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in checkpoint.dir")
    args = parser.parse_args(argv)
    _quiet()

    from megavlm.config.recipe import load_recipe
    from megavlm.config.schema import ConfigError
    from megavlm.parallel import init as pinit
    from megavlm.training.trainer import Trainer

    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    if restart and not args.resume and _rank() == 0:
        print(f"torchrun restart {restart}: resuming from the latest complete checkpoint", flush=True)
    try:
        Trainer(recipe, resume=args.resume or restart > 0).run()
    except _user_errors() as err:
        if _rank() == 0:  # every rank stops for the same reason: one message
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        pinit.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
