"""torchrun worker: the model-state bytes every rank really holds under several layouts.

For each layout (TPxPP, plain or distributed optimizer; DP takes the rest of the world) it builds
the recipe's model, stage, megatron-core DDP and optimizer as the trainer does, trains one step on
synthetic batches (so Adam's moments exist) and writes what this rank holds: every parameter
storage once, the gradient buffers, the optimizer's moments and main copies. The test compares
these with the planner's meta-device count of the same layout.
"""
import argparse
import dataclasses
import json
import os

from megavlm.config.recipe import load_recipe
from megavlm.data.synthetic import synthetic_batches
from megavlm.models.common.layer_specs import lm_head
from megavlm.parallel import init as pinit
from megavlm.training.build import build_model
from megavlm.training.memory import build_ddp_and_optimizer, measured_optimizer_bytes, recipe_dtype
from megavlm.training.stages import apply_stage
from megavlm.training.step import configure_schedule, lm_loss_fn, train_step

SAMPLES, SEQ = 4, 32


def layout_recipe(path: str, layout: str):
    """``layout``: TPxPP[-dist]."""
    shape, _, kind = layout.partition("-")
    tp, pp = shape.split("x")
    return load_recipe(path, [f"parallel.tensor_parallel={tp}", f"parallel.pipeline_parallel={pp}",
                              f"optimizer.distributed={str(kind == 'dist').lower()}", "train.overlap_grad_reduce=true",
                              f"train.seq_length={SEQ}", "train.micro_batch_size=1"])


def measure(recipe) -> dict:
    ctx = pinit.initialize(recipe.parallel, seed=0)
    pgs = pinit.process_groups()
    model = build_model(recipe.model, recipe.parallel, ctx, pgs, dtype=recipe_dtype(recipe))
    apply_stage(model, recipe.stage)
    ddp, optimizer = build_ddp_and_optimizer(model, recipe, ctx.device)
    configure_schedule([ddp])
    batches = synthetic_batches(recipe.model, SAMPLES, SEQ, micro_batch_size=1, seed=0, image_pattern=(1,))
    loss_fn = lm_loss_fn(lm_head(recipe.model, pgs.tp, model.output_weight))
    result = train_step([ddp], optimizer, batches[ctx.dp_rank::ctx.dp_size], loss_fn, SEQ, 1)
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    out = {"tp_rank": ctx.tp_rank, "pp_rank": ctx.pp_rank, "dp_rank": ctx.dp_rank, "dp_size": ctx.dp_size,
           "stepped": not result.skipped, "params": sum(storages.values()),
           "grads": sum(b.grad_data.numel() * b.grad_data.element_size() for b in ddp.buffers),
           "optimizer": measured_optimizer_bytes(optimizer, recipe.train.dtype != "fp32")}
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--layouts", required=True, help="comma-separated TPxPP[-dist]")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rank = int(os.environ["RANK"])
    for layout in args.layouts.split(","):
        recipe = layout_recipe(args.recipe, layout)
        recipe = dataclasses.replace(recipe, stage=dataclasses.replace(recipe.stage, init_from=None))
        with open(os.path.join(args.out, f"{layout}.rank{rank}.json"), "w") as f:
            json.dump(measure(recipe), f)
    pinit.destroy()


if __name__ == "__main__":
    main()
