#!/usr/bin/env python
"""Evaluate a checkpoint on standard benchmarks (local copies in their published formats):
answers generated greedily with the KV cache, samples split over data-parallel ranks, each
metric printed next to the same model's score on a blank image.

    torchrun --nproc_per_node 2 tools/evaluate.py --ckpt outputs/quickstart/stage3 \\
        --benchmarks pope=data/embedded/benchmarks/pope vqav2=data/embedded/benchmarks/vqav2:200 [--tp 2]
    python tools/evaluate.py --ckpt outputs/quickstart/stage3 --embedded data/embedded   # every embedded benchmark

A benchmark is NAME=PATH[:MAX_SAMPLES]; without --benchmarks, the recipe's eval.benchmarks.
Results: <out>/results.json, answers_<benchmark>[_blank].jsonl, TensorBoard scalars under <out>.

A contrastive (CLIP / SigLIP) checkpoint is scored zero-shot: image->text and text->image
retrieval R@1/5/10 and the mean CLIP similarity of matched vs shuffled pairs on a captions file
(--captions, else the embedded test captions with --embedded, else the recipe's eval.captions),
and retrieval benchmarks (flickr30k_retrieval):

    python tools/evaluate.py --ckpt outputs/clip/debug --embedded data/embedded
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
EMBEDDED = ("vqav2", "coco_captions", "pope", "mmbench", "seedbench", "scienceqa", "refcoco")
EMBEDDED_RETRIEVAL = ("flickr30k_retrieval",)   # what a contrastive checkpoint is scored on


def benchmark_specs(args, recipe):
    from megavlm.config.recipe import BenchmarkConfig

    specs = []
    for item in args.benchmarks or []:
        name, _, rest = item.partition("=")
        if not rest:
            raise SystemExit(f"error: --benchmarks expects NAME=PATH[:MAX_SAMPLES], got {item!r}")
        path, _, limit = rest.rpartition(":") if rest.rsplit(":", 1)[-1].isdigit() else (rest, "", "")
        specs.append(BenchmarkConfig(name=name, path=path, max_samples=int(limit) if limit else args.max_samples))
    if args.embedded:
        names = EMBEDDED_RETRIEVAL if recipe.model.head == "contrastive" else EMBEDDED
        specs += [BenchmarkConfig(name=n, path=str(Path(args.embedded) / "benchmarks" / n), max_samples=args.max_samples)
                  for n in names]
    return specs or list(recipe.eval.benchmarks)


def captions_file(args, recipe) -> str | None:
    """The captions a contrastive checkpoint's zero-shot metrics are measured on."""
    if args.captions:
        return args.captions
    if args.embedded:
        return str(Path(args.embedded) / "captions_test.jsonl")
    return recipe.eval.captions


def captions_result(ctx, path: str, limit: int | None) -> dict:
    """Zero-shot retrieval and matched/shuffled similarity as one row group of the results table."""
    from megavlm.data.build import open_eval_source
    from megavlm.eval.contrastive import contrastive_metrics

    source = open_eval_source(path, "captions", None, "--captions")
    skipped: list = []
    metrics = contrastive_metrics(ctx, source, limit or len(source), skipped=skipped)
    reasons: dict = {}
    for reason, _ in skipped:
        reasons[reason] = reasons.get(reason, 0) + 1
    return {"image": {"metrics": metrics, "samples": int(metrics.get("retrieval_samples", 0)), "skipped": reasons,
                      "answers": []}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a checkpoint (step_N) or a run's checkpoint.dir (its latest)")
    parser.add_argument("--benchmarks", nargs="*", help="NAME=PATH[:MAX_SAMPLES] ...")
    parser.add_argument("--embedded", help="the embedded dataset's directory: all its benchmarks")
    parser.add_argument("--captions", help="contrastive checkpoints: a captions JSONL for zero-shot retrieval and "
                                           "matched vs shuffled CLIP similarity")
    parser.add_argument("--max-samples", type=int, default=None, help="questions per benchmark (default: all)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument("--no-blank", action="store_true", help="skip the blank-image baseline")
    parser.add_argument("--out", help="results directory (default: <ckpt>/eval)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the saved recipe (e.g. data.tokenizer=...)")
    args = parser.parse_args(argv)

    import torch.distributed as dist
    from megatron.core import parallel_state

    from megavlm.config.schema import ConfigError
    from megavlm.eval.benchmark_runner import flat_metrics, format_table, load_benchmarks, run_benchmarks, write_results
    from megavlm.eval.benchmarks import BenchmarkError
    from megavlm.eval.checkpoint_model import checkpoint_recipe, load_eval_model, parallel_from_args
    from megavlm.parallel import init as pinit
    from megavlm.training.checkpoint import resolve_checkpoint

    try:
        recipe = checkpoint_recipe(args.ckpt, args.overrides)
        loaded = load_benchmarks(benchmark_specs(args, recipe))   # every input error before the model is built
        contrastive = recipe.model.head == "contrastive"
        captions = captions_file(args, recipe) if contrastive else None
        wrong = [lb.benchmark.name for lb in loaded if contrastive and lb.benchmark.kind != "retrieval"]
        if wrong:
            raise BenchmarkError(f"{', '.join(wrong)}: a contrastive checkpoint scores image-text pairs; it cannot "
                                 f"generate answers")
        if captions and not Path(captions).is_file():
            raise FileNotFoundError(f"--captions: {captions} does not exist")
    except (BenchmarkError, ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not loaded and not captions:
        print("error: no benchmarks: pass --benchmarks, --embedded or set eval.benchmarks in the recipe"
              + (" (or --captions for a contrastive checkpoint)" if contrastive else ""), file=sys.stderr)
        return 2
    try:
        ctx, pctx = load_eval_model(args.ckpt, recipe, parallel_from_args(args.tp, args.pp), args.micro_batch_size)
        results = run_benchmarks(ctx, loaded, recipe.data.template, pctx.dp_rank, pctx.dp_size,
                                 parallel_state.get_data_parallel_group(), not args.no_blank and not contrastive,
                                 show_progress=pctx.is_main and not args.no_progress)
        if captions:
            results["captions"] = captions_result(ctx, captions, args.max_samples)
        if pctx.is_main:
            ckpt = resolve_checkpoint(args.ckpt)
            out = Path(args.out) if args.out else ckpt / "eval"
            path = write_results(results, out, {"checkpoint": str(ckpt)})
            _tensorboard(out, flat_metrics(results), ckpt)
            print(format_table(results))
            print(f"results: {path}")
        dist.barrier()
    finally:
        pinit.destroy()
    return 0


def _tensorboard(out: Path, scalars: dict, ckpt: Path) -> None:
    import json

    from torch.utils.tensorboard import SummaryWriter

    state = ckpt / "trainer_state.json"
    step = json.loads(state.read_text()).get("step", 0) if state.is_file() else 0
    with SummaryWriter(str(out)) as writer:
        for name, value in scalars.items():
            writer.add_scalar(f"eval/{name}", value, step)


if __name__ == "__main__":
    sys.exit(main())
