"""Train one stage, or several stages in order, from recipes (under torchrun or srun).

    torchrun --nproc_per_node 2 -m megavlm.train examples/recipes/quickstart/llava_debug_stage1.yaml \\
        [--resume] [key=value ...]
    torchrun --nproc_per_node 2 -m megavlm.train stage1.yaml stage2.yaml [key=value ...]

Arguments with '=' are overrides applied to every recipe; the others are recipes. Several recipes run
one after the other in the same processes (each stage a fresh model, optimizer and data loader;
the process group is kept), exactly as separate runs of each would.

Exit status: 0 when the stage finished or stopped early with a checkpoint (SIGTERM / SIGUSR1,
train.exit_duration_minutes, train.exit_at_step: continue with --resume); 2 for a stop the user
must act on (bad recipe, missing file, bad data past the skip budget, template mismatch, broken
checkpoint), printed as one message on rank 0 with no traceback. Under ``torchrun --max-restarts``
a restarted worker resumes from the latest complete checkpoint by itself.
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import time
from pathlib import Path


EXAMPLES = """examples:
  megavlm train --nproc 2 examples/recipes/quickstart/llava_debug_stage1.yaml train.max_steps=20
  torchrun --nproc_per_node 8 -m megavlm.train examples/recipes/llava_1.5_7b_stage1.yaml --resume
  srun --ntasks-per-node 8 python -m megavlm.train examples/recipes/llava_1.5_7b_stage2.yaml
"""


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


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="megavlm train", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("args", nargs="+", metavar="RECIPE | key=value",
                        help="YAML recipes (examples/recipes/...), then overrides, e.g. train.max_steps=10")
    parser.add_argument("--resume", action="store_true",
                        help="continue each stage from the latest checkpoint in its checkpoint.dir "
                             "(a stage that already finished is skipped)")
    parser.add_argument("--nproc", type=int, default=None, metavar="N",
                        help="outside torchrun/srun: start torchrun with N processes on this machine")
    args = parser.parse_args(argv)
    args.overrides = [a for a in args.args if "=" in a]
    args.recipes = [a for a in args.args if "=" not in a]
    if not args.recipes:
        parser.error("no recipe given (arguments with '=' are overrides)")
    return args


def load_all(recipe_paths: list[str], overrides: list[str]):
    """Every recipe, checked before the first stage starts; None (after printing why) if one is bad."""
    from megavlm.config.recipe import load_recipe
    from megavlm.config.schema import ConfigError

    try:
        return [load_recipe(path, overrides) for path in recipe_paths]
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return None


def run_stages(recipe_paths: list[str], overrides: list[str], resume: bool = False) -> int:
    recipes = load_all(recipe_paths, overrides)
    if recipes is None:
        return 2
    from megavlm.parallel import init as pinit
    from megavlm.training.trainer import Trainer

    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    if restart and not resume and _rank() == 0:
        print(f"torchrun restart {restart}: resuming from the latest complete checkpoint", flush=True)
    resume = resume or restart > 0
    start = time.perf_counter()
    try:
        for path, recipe in zip(recipe_paths, recipes):
            trainer = Trainer(recipe, resume=resume)
            trainer.run()
            if trainer.step < trainer.total_steps:  # stopped early (preemption, time limit, exit_at_step)
                if trainer.ctx.is_main and path != recipe_paths[-1]:
                    print(f"{recipe.stage.name} stopped at step {trainer.step}/{trainer.total_steps}: "
                          f"the later stages wait for it; continue with --resume", flush=True)
                break
            is_main = trainer.ctx.is_main
            del trainer
            gc.collect()
        else:
            if len(recipes) > 1 and is_main:
                print(f"{len(recipes)} stages finished in {time.perf_counter() - start:.0f} s", flush=True)
    except _user_errors() as err:
        if _rank() == 0:  # every rank stops for the same reason: one message
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        pinit.destroy()
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.nproc and not {"RANK", "SLURM_PROCID"} & set(os.environ):  # start the workers, each runs this command without --nproc
        if load_all(args.recipes, args.overrides) is None:
            return 2
        rest = [*args.args] + (["--resume"] if args.resume else [])
        os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  f"--nproc_per_node={args.nproc}", "-m", "megavlm.train", *rest])
    from megavlm.console import setup_entry_point

    setup_entry_point()
    return run_stages(args.recipes, args.overrides, args.resume)


def run_example(script: str, stages: list[tuple[str | None, str]], replace_all: str | None = None,
                fresh: str | None = None, argv=None) -> int:
    """The Python half of an examples/*.sh launcher, run by each torchrun worker: the same stages,
    recipes and overrides as `bash examples/X.sh`. ``stages`` pairs an environment variable that may
    name another recipe with the default (relative to examples/); ``replace_all`` names a variable
    holding a space-separated list that replaces every stage; ``fresh`` is a folder removed first
    (by rank 0, before the process group exists, unless --resume). Relative paths (data/, outputs/,
    recipes given in the environment) resolve against WORKDIR, else the repository, as in the bash half."""
    here = Path(script).resolve().parent
    workdir = Path(os.environ.get("WORKDIR") or here.parent)
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    if replace_all and os.environ.get(replace_all):
        recipes = os.environ[replace_all].split()
    else:
        recipes = [os.environ.get(var) if var and os.environ.get(var) else str(here / default)
                   for var, default in stages]
    args = sys.argv[1:] if argv is None else argv
    if fresh and "--resume" not in args and int(os.environ.get("RANK", 0)) == 0:
        shutil.rmtree(fresh, ignore_errors=True)
    return main([*recipes, *args])


if __name__ == "__main__":
    sys.exit(main())
