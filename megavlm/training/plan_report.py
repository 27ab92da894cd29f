"""The planner's inputs and outputs: the workload from a recipe and its data (or the command
line), a measured MFU from a throughput benchmark, the printed tables and their JSON form."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megavlm.config.schema import ConfigError
from megavlm.training.plan import GIB, Gpu, Planner, PlanRow, Workload

# The benchmark's stages (tools/benchmark_throughput.py): what trains in each.
BENCHMARK_STAGES = {1: {"connector"}, 2: {"connector", "llm"}}


def parse_gpu_counts(text: str) -> list[int]:
    """"8", "8,16,64" or "8..256" (the powers of two from 8 to 256)."""
    try:
        if ".." in text:
            low, high = (int(x) for x in text.split(".."))
            counts, n = [], 1
            while n <= high:
                if n >= low:
                    counts.append(n)
                n *= 2
            return counts
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ConfigError(f"bad value for '--gpus': {text!r} (e.g. 8, 8,16,64 or 8..256)")
    return counts


@dataclass
class WorkloadInputs:
    samples: int | None = None
    tokens_per_sample: float | None = None
    images_per_sample: float | None = None


def workload_for(recipe, given: WorkloadInputs) -> Workload:
    """Samples, tokens and images per sample: from the command line where given, else measured
    on the recipe's data, else (tokens, images) assumed and said so."""
    from megavlm.data.stats import dataset_statistics

    train, sources = recipe.train, []
    stats, unreadable = None, None
    if given.samples is None or given.tokens_per_sample is None or given.images_per_sample is None:
        try:
            stats = dataset_statistics(recipe)
        except ConfigError as err:
            unreadable = str(err)
    if given.samples is not None:
        samples = given.samples
        sources.append(f"{samples:,} samples (--samples)")
    elif train.max_steps:
        samples = train.max_steps * train.global_batch_size
        sources.append(f"{samples:,} samples (train.max_steps x global batch)")
    elif stats is not None:
        samples = round(stats.samples * train.epochs)
        sources.append(f"{stats.describe(recipe.data.train or 'data.sources')} x {train.epochs:g} epoch(s)")
    else:
        raise ConfigError(f"{unreadable}: the planner needs the data set's size; pass --samples N")
    tokens = _pick(given.tokens_per_sample, stats and stats.mean_tokens, train.seq_length, "tokens per sample",
                   "--tokens-per-sample", "full rows of train.seq_length: an upper bound", sources)
    if tokens > train.seq_length:
        raise ConfigError(f"bad value for '--tokens-per-sample': {tokens:g} is more than train.seq_length "
                          f"{train.seq_length} (a longer sample is skipped, not trained)")
    images = _pick(given.images_per_sample, stats and stats.mean_images, 1.0, "images per sample",
                   "--images-per-sample", "one per sample", sources)
    return Workload(samples, tokens, images, train.seq_length, recipe.data.packing, tuple(sources))


def _pick(given, measured, default, what: str, flag: str, assumption: str, sources: list) -> float:
    if given is not None:
        sources.append(f"{given:g} {what} ({flag})")
        return float(given)
    if measured:
        return float(measured)   # described with the sample count
    sources.append(f"{default:g} {what} (assumed: {assumption}; measure it with the data and tokenizer, or pass {flag})")
    return float(default)


def mfu_from_benchmark(path: str, trainable: set[str], gpu: Gpu) -> tuple[float, str]:
    """The MFU megavlm measured (tools/benchmark_throughput.py --json) for the benchmark stage
    that trains what this recipe trains (else its first stage)."""
    try:
        rows = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"bad value for '--throughput': {path} is not a readable benchmark JSON ({err})") from None
    ours = [r for r in rows if isinstance(r, dict) and r.get("peer") == "ours" and "error" not in r]
    if not ours:
        raise ConfigError(f"bad value for '--throughput': {path} holds no successful 'ours' run")
    match = [r for r in ours if BENCHMARK_STAGES.get(r.get("stage")) == trainable] or ours
    row = match[0]
    if not row.get("mfu"):
        raise ConfigError(f"bad value for '--throughput': {path} was measured on {row.get('device', 'a CPU')}, "
                          f"which has no known peak: no MFU")
    note = f"measured: {path}, stage {row['stage']} on {row['device']}"
    if gpu.name.split()[1] not in row.get("device", ""):
        note += f" (planning for the {gpu.name}: a different GPU)"
    return float(row["mfu"]), note


def gib(value: float) -> str:
    return f"{value / GIB:.1f}"


def header(recipe_path: str, planner: Planner, mfu_note: str) -> str:
    r, work = planner.recipe, planner.work
    mbs = r.train.micro_batch_size
    rows = (f"packed into {work.seq_length}-token rows ({100 * work.padding(mbs):.0f}% padding at micro-batch {mbs})"
            if work.packed else
            f"padded to {work.seq_length} tokens each ({100 * work.padding(mbs):.0f}% padding"
            + (f"; data.packing=true would compute {work.computed_tokens_per_sample(mbs) / work.tokens_per_sample:.1f}x "
               f"fewer tokens)" if work.padding(mbs) > 0.2 else ")"))
    trainable = ", ".join(sorted(planner.trainable))
    lines = [f"plan: {recipe_path}",
             f"  GPU     {planner.gpu.describe()}",
             f"  model   {r.model.family} {r.model.flavor}, {r.train.dtype}{', FP8' if r.model.fp8 else ''}; trains {trainable}",
             *(f"  data    {s}" if i == 0 else f"          {s}" for i, s in enumerate(work.sources)),
             f"  rows    {rows}",
             f"  MFU     {100 * planner.mfu:.1f}% ({mfu_note})",
             f"  batch   global {r.train.global_batch_size}: {planner.steps:,} steps"]
    return "\n".join(lines)


COLUMNS = (f"{'GPUs':>5}  {'layout':<22} {'SP':>2} {'rc':>2} {'DO':>2} {'GiB/GPU':>8} {'params':>7} {'grads':>6} "
           f"{'optim':>6} {'activ':>6} {'step s':>8} {'bubble':>7} {'comm':>6} {'tok/s/GPU':>10} {'MFU':>6} "
           f"{'hours':>8} {'GPU-h':>9} {'cost $':>9}")


def _flag(value: bool) -> str:
    return "on" if value else "-"


def format_row(row: PlanRow) -> str:
    lay, mem, t = row.layout, row.memory, row.time
    return (f"{lay.gpus:>5}  {lay.label():<22} {_flag(lay.sequence_parallel):>2} {_flag(lay.recompute):>2} "
            f"{_flag(lay.distributed_optimizer):>2} {gib(mem.total):>8} {gib(mem.params):>7} {gib(mem.grads):>6} "
            f"{gib(mem.optimizer):>6} {gib(mem.activations):>6} {t.step:>8.3f} {t.bubble:>7.3f} "
            f"{t.tp_comm + t.pp_comm + t.dp_exposed:>6.3f} {row.tokens_per_s_per_gpu:>10.0f} {100 * row.mfu:>5.1f}% "
            f"{row.hours:>8.2f} {row.gpu_hours:>9.1f} {row.cost:>9,.0f}")


def format_failure(row: PlanRow, usable: float) -> str:
    mem = row.memory
    terms = ", ".join(f"{name} {gib(value)}" for name, value in mem.terms())
    return (f"  {row.layout.label()} (its smallest variant{', recompute on' if row.layout.recompute else ''}): "
            f"{gib(mem.total)} GiB > {gib(usable)} usable on pipeline stage {mem.pp_rank}: "
            f"the limit is passed at the {row.overflow} ({terms} GiB)")


def format_plan(gpus: int, fitting: list[PlanRow], failing: list[PlanRow], usable: float, top: int) -> str:
    lines = []
    if fitting:
        lines += [format_row(r) for r in fitting[:top]]
        if len(fitting) > top:
            lines.append(f"{'':>5}  ... {len(fitting) - top} slower layouts that fit (--top N shows more)")
    else:
        lines.append(f"{gpus:>5}  no layout fits")
    if failing:
        lines.append(f"{'':>5}  does not fit at {gpus} GPUs:")
        lines += [format_failure(r, usable) for r in failing]
    return "\n".join(lines)


def row_json(row: PlanRow) -> dict:
    mem, t = row.memory, row.time
    return {"layout": vars(row.layout), "overrides": row.layout.overrides(), "fits": row.fits,
            "overflow": row.overflow, "memory_bytes": {name: value for name, value in mem.terms()} | {"total": mem.total},
            "fullest_pipeline_stage": mem.pp_rank, "activation_terms_per_micro_batch": mem.activation_terms,
            "micro_batches_in_flight": mem.in_flight,
            "step_seconds": {"compute": t.compute, "tp_comm": t.tp_comm, "pp_comm": t.pp_comm, "bubble": t.bubble,
                             "dp_comm": t.dp_comm, "dp_exposed": t.dp_exposed, "total": t.step},
            "steps": row.steps, "tokens_per_s_per_gpu": row.tokens_per_s_per_gpu, "mfu": row.mfu,
            "hours": row.hours, "gpu_hours": row.gpu_hours, "cost": row.cost}


def summary(best: dict[str, dict[int, PlanRow]]) -> str:
    """Per GPU count, each stage's fastest fitting layout and the totals."""
    counts = sorted({g for per_stage in best.values() for g in per_stage})
    lines = [f"{'GPUs':>5}  {'stage':<28} {'layout':<22} {'hours':>8} {'GPU-h':>9} {'cost $':>9}"]
    for gpus in counts:
        hours = gpu_hours = cost = 0.0
        complete = True
        for stage, per_gpus in best.items():
            row = per_gpus.get(gpus)
            if row is None:
                lines.append(f"{gpus:>5}  {stage:<28} {'no layout fits':<22}")
                complete = False
                continue
            lines.append(f"{gpus:>5}  {stage:<28} {row.layout.label():<22} {row.hours:>8.2f} {row.gpu_hours:>9.1f} "
                         f"{row.cost:>9,.0f}")
            hours, gpu_hours, cost = hours + row.hours, gpu_hours + row.gpu_hours, cost + row.cost
        if complete and len(best) > 1:
            lines.append(f"{gpus:>5}  {'all stages':<28} {'':<22} {hours:>8.2f} {gpu_hours:>9.1f} {cost:>9,.0f}")
    return "\n".join(lines)


def validate(recipe, steps: int = 2) -> list[tuple[str, float, float]]:
    """Estimated vs measured bytes of ``recipe`` in this one process (TP = PP = DP = 1): the
    counted model state against the real model, DDP buffers and optimizer after ``steps`` steps;
    the activation estimate against the tensors autograd saves for one micro-batch (each storage
    once, on any device)."""
    import dataclasses

    import torch

    from megavlm.config.model import ParallelConfig
    from megavlm.data.synthetic import synthetic_batches
    from megavlm.models.common.layer_specs import lm_head
    from megavlm.parallel import init as pinit
    from megavlm.training.activations import Placement, activation_estimate
    from megavlm.training.build import build_model
    from megavlm.training.memory import (build_ddp_and_optimizer, layout_state_bytes, measured_optimizer_bytes,
                                         recipe_dtype, saved_activation_bytes)
    from megavlm.training.stages import apply_stage
    from megavlm.training.step import configure_schedule, forward_backward, lm_loss_fn, train_step

    recipe = dataclasses.replace(recipe, parallel=ParallelConfig())
    counted = layout_state_bytes(recipe, 1, 1, 1)
    train, cfg, dtype = recipe.train, recipe.model, recipe_dtype(recipe)
    ctx = pinit.initialize(recipe.parallel, seed=0)
    try:
        model = build_model(cfg, recipe.parallel, ctx, pinit.process_groups(), dtype=dtype, recompute=train.recompute)
        apply_stage(model, recipe.stage)
        ddp, optimizer = build_ddp_and_optimizer(model, recipe, ctx.device)
        configure_schedule([ddp])
        mbs, seq = train.micro_batch_size, train.seq_length
        batches = synthetic_batches(cfg, mbs, seq, micro_batch_size=mbs, seed=0, image_pattern=(1,),
                                    device=ctx.device)
        for batch in batches:
            batch["images"] = batch["images"].to(dtype)
        loss_fn = lm_loss_fn(lm_head(cfg, pinit.process_groups().tp, model.output_weight))
        for _ in range(steps):
            train_step([ddp], optimizer, batches, loss_fn, seq, mbs)
        storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
        grads = sum(b.grad_data.numel() * b.grad_data.element_size() for b in ddp.buffers)
        measured_optimizer = measured_optimizer_bytes(optimizer, dtype != torch.float32)
        saved = saved_activation_bytes(lambda: forward_backward([ddp], batches, loss_fn, seq, mbs), model)
    finally:
        pinit.destroy()
    estimate = activation_estimate(cfg, set(recipe.stage.trainable), mbs, seq, 1.0,
                                   Placement(1, False, dtype.itemsize, "full" if train.recompute else "off"),
                                   cfg.language.num_layers if cfg.head == "lm" else 0)
    rows = [("parameters", counted.params, sum(storages.values())), ("gradient buffers", counted.grads, grads),
            ("optimizer state", counted.optimizer, measured_optimizer),
            ("activations (saved tensors)", sum(estimate.terms.values()), saved)]
    return rows


def format_validation(rows: list[tuple[str, float, float]]) -> str:
    lines = [f"{'':<30} {'estimated':>14} {'measured':>14} {'difference':>11}"]
    for name, estimated, measured in rows:
        diff = 100 * (estimated - measured) / measured if measured else 0.0
        lines.append(f"{name:<30} {estimated:>14,.0f} {measured:>14,.0f} {diff:>10.2f}%")
    return "\n".join(lines)
