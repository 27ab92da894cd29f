#!/usr/bin/env python
"""Memory, parallel layout, time and cost of training stages, from their recipes, before a GPU
is rented.

    python tools/plan.py RECIPE [RECIPE ...] [key=value ...] --gpu h100-80gb --gpus 8..256
        [--price 2.5] [--mfu 0.4 | --throughput bench.json] [--samples N] [--tokens-per-sample T]
        [--images-per-sample I] [--top 5] [--json] [--brief]
    python tools/plan.py RECIPE [key=value ...] --validate

For every GPU count, every layout the recipe can run (TP inside a node, PP that splits the
decoder, the recipe's micro-batch or a smaller one, recompute off/on; sequence parallelism and
the distributed optimizer wherever they apply) is priced: model state counted exactly on the
meta device, activations and step time from the formulas printed above the tables. The layouts
that fit are listed fastest first with the recipe overrides of the best; those that do not fit
name the term that overflows. Several recipes (the stages of one run) also get a summary with
the totals. Data size and mean sample length are read from the recipe's data set when it is
there; otherwise pass --samples (and --tokens-per-sample, or full rows are assumed).

--validate builds the recipe's model in its debug flavor in this process, trains a few steps on
synthetic batches and prints estimated vs measured parameter, gradient, optimizer and activation
bytes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="recipe files, then key=value overrides (applied to each)")
    parser.add_argument("--gpu", default="h100-80gb", help="a GPU of megavlm/training/gpus.yaml")
    parser.add_argument("--gpus", default="8", help="GPU counts: 8, 8,16,64 or 8..256 (powers of two)")
    parser.add_argument("--price", type=float, default=None, help="USD per GPU-hour (default: the table's)")
    parser.add_argument("--mfu", type=float, default=None, help="model FLOPs utilisation to assume (0-1)")
    parser.add_argument("--throughput", default=None, help="tools/benchmark_throughput.py --json output: its MFU")
    parser.add_argument("--samples", default=None, help="training samples in all, epochs included (one value, "
                        "or one per recipe: 558128,665298)")
    parser.add_argument("--tokens-per-sample", default=None, help="mean real tokens per sample (one, or one per recipe)")
    parser.add_argument("--images-per-sample", default=None, help="mean images per sample (one, or one per recipe)")
    parser.add_argument("--top", type=int, default=5, help="fitting layouts shown per GPU count")
    parser.add_argument("--json", action="store_true", help="the plan as JSON on stdout")
    parser.add_argument("--brief", action="store_true", help="no formulas above the tables")
    parser.add_argument("--validate", action="store_true", help="estimated vs measured bytes of the debug flavor")
    args = parser.parse_intermixed_args(argv)   # recipes and overrides may follow the options
    args.recipes = [x for x in args.inputs if "=" not in x]
    args.overrides = [x for x in args.inputs if "=" in x]
    if not args.recipes:
        parser.error("give at least one recipe file")
    if args.mfu is not None and not 0 < args.mfu <= 1:
        parser.error("--mfu is a fraction in (0, 1]")
    if args.mfu is not None and args.throughput:
        parser.error("give --mfu or --throughput, not both")
    for name in ("samples", "tokens_per_sample", "images_per_sample"):
        setattr(args, name, per_recipe(parser, name, getattr(args, name), len(args.recipes)))
    return args


def per_recipe(parser, name: str, text: str | None, recipes: int) -> list:
    """A value for each recipe: one given for all, or a comma-separated one per recipe."""
    if text is None:
        return [None] * recipes
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        parser.error(f"--{name.replace('_', '-')}: {text!r} is not a number or a comma-separated list of numbers")
    if len(values) not in (1, recipes):
        parser.error(f"--{name.replace('_', '-')}: {len(values)} values for {recipes} recipes")
    values = values * recipes if len(values) == 1 else values
    return [int(v) for v in values] if name == "samples" else values


def local_layers(overrides: list[str]) -> list[str]:
    """Transformer Engine's layers hold the same parameters as the local ones: count with the
    local spec where TE does not import (as on a laptop planning a GPU run)."""
    from megavlm.models.common.layer_specs import te_available

    return overrides if te_available() else overrides + ["model.transformer_impl=local", "model.fp8=null"]


def formulas() -> str:
    from megavlm.training import activations, flops, plan

    sections = [("FLOPs per sample", "flops.py", flops.__doc__.split("\n\n", 2)[2]),
                ("Activations", "activations.py", activations.__doc__.split("\n\n", 1)[1]),
                ("Memory and time", "plan.py", plan.__doc__.split("\n\n", 1)[1])]
    return "\n\n".join(f"{title} (megavlm/training/{file}):\n{text.rstrip()}" for title, file, text in sections)


def plan_recipe(index: int, path: str, args, gpu, counts: list[int]):
    from megavlm.config.recipe import load_recipe
    from megavlm.training.plan import Planner
    from megavlm.training.plan_report import WorkloadInputs, mfu_from_benchmark, workload_for

    recipe = load_recipe(path, local_layers(args.overrides))
    work = workload_for(recipe, WorkloadInputs(args.samples[index], args.tokens_per_sample[index],
                                               args.images_per_sample[index]))
    mfu, note = args.mfu, "--mfu"
    if args.throughput:
        mfu, note = mfu_from_benchmark(args.throughput, set(recipe.stage.trainable), gpu)
    elif mfu is None:
        note = f"the {gpu.key} default in gpus.yaml: an assumption; --throughput bench.json gives a measured one"
    planner = Planner(recipe, gpu, work, mfu, args.price)
    plans = {gpus: planner.plan(gpus) for gpus in counts}
    return recipe, planner, note, plans


def run_plan(args) -> int:
    from megavlm.training.plan import find_gpu
    from megavlm.training.plan_report import (COLUMNS, format_plan, header, parse_gpu_counts, row_json,
                                              summary)

    gpu, counts = find_gpu(args.gpu), parse_gpu_counts(args.gpus)
    out, best = [], {}
    if not args.json and not args.brief:
        print(formulas() + "\n")
    for index, path in enumerate(args.recipes):
        recipe, planner, note, plans = plan_recipe(index, path, args, gpu, counts)
        best[recipe.stage.name] = {g: fitting[0] for g, (fitting, _) in plans.items() if fitting}
        if args.json:
            out.append({"recipe": path, "stage": recipe.stage.name, "gpu": gpu.key, "mfu": planner.mfu,
                        "workload": vars(planner.work) | {"sources": list(planner.work.sources)},
                        "plans": {g: [row_json(r) for r in fitting + failing] for g, (fitting, failing) in plans.items()}})
            continue
        print(header(path, planner, note) + "\n\n" + COLUMNS)
        for gpus, (fitting, failing) in plans.items():
            print(format_plan(gpus, fitting, failing, gpu.usable_bytes, args.top))
        fastest = [rows[0] for rows, _ in plans.values() if rows]
        if fastest:
            print(f"\nfastest at {fastest[0].layout.gpus} GPUs: {' '.join(fastest[0].layout.overrides())}\n")
    if args.json:
        print(json.dumps(out, indent=1))
    elif len(args.recipes) > 1 or len(counts) > 1:
        print(f"summary: the fastest layout that fits, per stage and GPU count ({gpu.key})\n" + summary(best))
    return 0


def run_validate(args) -> int:
    from megavlm.config.recipe import load_recipe
    from megavlm.training.plan_report import format_validation, validate

    for path in args.recipes:
        recipe = load_recipe(path, local_layers(args.overrides + ["model.flavor=debug"]))
        print(f"validate: {path} as model.flavor=debug, {recipe.train.dtype}, micro-batch "
              f"{recipe.train.micro_batch_size} x {recipe.train.seq_length} tokens, recompute "
              f"{'on' if recipe.train.recompute else 'off'}; trains {', '.join(recipe.stage.trainable)}")
        print(format_validation(validate(recipe)) + "\n")
    return 0


def main(argv=None) -> int:
    from megavlm.config.schema import ConfigError
    from megavlm.console import filter_known_warnings

    filter_known_warnings()
    args = parse_args(argv)
    try:
        return run_validate(args) if args.validate else run_plan(args)
    except ConfigError as err:
        print(f"plan: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
