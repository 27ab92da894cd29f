"""Train one stage from a recipe (under torchrun or srun).

    torchrun --nproc_per_node 2 -m megavlm.train examples/recipes/quickstart/llava_debug_stage1.yaml \
        [--resume] [key=value ...]
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
    try:
        Trainer(recipe, resume=args.resume).run()
    finally:
        pinit.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
