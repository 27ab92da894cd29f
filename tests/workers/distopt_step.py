"""torchrun worker: three LLaVA debug training steps with megatron-core's distributed optimizer
(gradients reduce-scattered over DP, overlapped with the backward; the parameter all-gather
overlapped with the next forward) and, from the same weights, with the plain optimizer. Rank 0
saves each run's per-step losses and final parameters in full form. With --checkpoint the
distributed run also saves a checkpoint after step 2, with the parameters it had then."""
import argparse
import os

import torch
from safetensors.torch import load_file

from megavlm.config.model import ParallelConfig
from megavlm.config.recipe import CheckpointConfig, OptimizerConfig, TrainConfig
from megavlm.data.synthetic import synthetic_batches
from megavlm.models.common.layer_specs import lm_head
from megavlm.models.registry import flavor_config, get_family
from megavlm.parallel import init as pinit
from megavlm.parallel.gather import gather_shards
from megavlm.training.build import build_model, ddp_config, load_local_state, params_in_sync, wrap_ddp
from megavlm.training.checkpoint import CheckpointManager
from megavlm.training.stages import megatron_optimizer_config
from megavlm.training.step import configure_schedule, lm_loss_fn, train_step

CFG = flavor_config("llava", "debug")
SEQ, SAMPLES, STEPS, LR = 48, 4, 3, 1e-3


def step_batches(step: int) -> list[dict]:
    """The global batch of ``step`` as one-sample micro-batches."""
    return synthetic_batches(CFG, SAMPLES, SEQ, micro_batch_size=1, seed=100 + step)


def build(parallel: ParallelConfig, distributed: bool, hf: dict):
    ctx = pinit.initialize(parallel, seed=0)
    pgs = pinit.process_groups()
    adapter = get_family("llava").adapter_cls(CFG, tp_size=ctx.tp_size, pp_size=ctx.pp_size)
    model = build_model(CFG, parallel, ctx, pgs)
    load_local_state(model, adapter.hf_to_megavlm(hf, ctx.tp_rank, ctx.pp_rank))
    opt = OptimizerConfig(lr=LR, weight_decay=0.01, warmup_steps=0, distributed=distributed)
    overlap = dict(overlap_grad_reduce=distributed, overlap_param_gather=distributed)
    ddp = wrap_ddp(model, ddp_config(TrainConfig(**overlap), opt, ctx.device))
    configure_schedule([ddp])
    from megatron.core.optimizer import get_megatron_optimizer

    optimizer = get_megatron_optimizer(megatron_optimizer_config(opt, torch.float32), [ddp])
    loss_fn = lm_loss_fn(lm_head(CFG, pgs.tp, model.output_weight))
    return ctx, adapter, model, ddp, optimizer, loss_fn


def full_params(ctx, adapter, model, ddp) -> dict | None:
    with params_in_sync(ddp):
        shards = gather_shards(model.state_dict(), ctx.tp_rank, ctx.pp_rank, ctx.dp_rank)
    return adapter.plan.unshard(shards) if ctx.is_main else None


def run(name: str, parallel: ParallelConfig, distributed: bool, hf: dict, out: str, checkpoint: str | None = None):
    ctx, adapter, model, ddp, optimizer, loss_fn = build(parallel, distributed, hf)
    losses, saved = [], None
    for step in range(1, STEPS + 1):
        mine = step_batches(step)[ctx.dp_rank::ctx.dp_size]
        result = train_step([ddp], optimizer, mine, loss_fn, SEQ, 1)
        losses.append(result.losses["lm_loss"])
        if checkpoint and step == 2:
            manager = CheckpointManager(CheckpointConfig(dir=checkpoint), CFG)
            with params_in_sync(ddp):
                manager.save(step, model, optimizer, {})
            saved = full_params(ctx, adapter, model, ddp)
    params = full_params(ctx, adapter, model, ddp)
    if ctx.is_main:
        torch.save({"losses": losses, "params": params, "params_at_2": saved}, os.path.join(out, f"{name}.pt"))
    torch.distributed.barrier()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--init", required=True, help="HF-format safetensors with the initial weights")
    parser.add_argument("--layout", required=True, help="TPxPP")
    parser.add_argument("--out", required=True)
    parser.add_argument("--checkpoint", default=None)
    args = parser.parse_args()
    tp, pp = (int(x) for x in args.layout.split("x"))
    parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp)
    hf = load_file(args.init)
    run(f"plain_{args.layout}", parallel, False, hf, args.out)
    run(f"distributed_{args.layout}", parallel, True, hf, args.out, args.checkpoint)
    pinit.destroy()


if __name__ == "__main__":
    main()
