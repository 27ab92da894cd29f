"""torchrun worker (2 processes): BLIP-2 stage-1 losses under TP=2 (each objective alone) and ITC
under DP=2 (each rank half of the batch), from the same full-form weights; rank 0 saves the
losses and the gradients gathered to full form."""
import argparse
import os

import torch
from safetensors.torch import load_file

from megavlm.config.model import ParallelConfig
from megavlm.config.schema import with_overrides
from megavlm.models.registry import flavor_config, get_family
from megavlm.parallel import init as pinit
from megavlm.parallel.gather import gather_shards, local_grads
from megavlm.training.build import build_model, wrap_ddp
from megavlm.training.step import configure_schedule, forward_backward
from megavlm.training.tasks import QFormerTask

CFG = with_overrides(flavor_config("blip2", "debug"), ["head=qformer"])


def batch(samples: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 250, (samples, 12), generator=g)
    mask = torch.ones(samples, 12, dtype=torch.long)
    mask[1, 9:] = 0
    mask[3, 6:] = 0
    return {"images": torch.randn(samples, 3, 56, 56, generator=g), "text_ids": ids, "text_mask": mask}


class _Recipe:  # what QFormerTask reads
    def __init__(self, weights):
        self.stage = type("S", (), {"loss_weights": weights})()


def run(objective: str, weights: dict, parallel: ParallelConfig, full: dict, out: str):
    ctx = pinit.initialize(parallel, seed=0)
    adapter = get_family("blip2").adapter_cls(CFG, tp_size=ctx.tp_size)
    model = build_model(CFG, parallel, ctx, pinit.process_groups())
    model.load_state_dict(adapter.plan.shard(full, ctx.tp_rank, 0), strict=False)
    ddp = wrap_ddp(model)
    configure_schedule([ddp])
    data = batch()
    per_rank = data["text_ids"].shape[0] // ctx.dp_size
    mine = {k: v[ctx.dp_rank * per_rank:(ctx.dp_rank + 1) * per_rank] for k, v in data.items()}
    task = QFormerTask.__new__(QFormerTask)
    task.weights = weights
    torch.manual_seed(123)  # the same ITM negatives at every layout
    ddp.zero_grad_buffer()
    result = forward_backward([ddp], [mine], task.loss_fn(), 12, per_rank)
    grads = gather_shards(local_grads(model), ctx.tp_rank, 0, ctx.dp_rank)
    if ctx.is_main:
        torch.save({"losses": result.losses, "grads": adapter.plan.unshard(grads)}, os.path.join(out, f"{objective}.pt"))
    torch.distributed.barrier()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--init", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    full = load_file(args.init)
    for objective in ("itc", "itm", "itg"):
        weights = {k: float(k == objective) for k in ("itc", "itm", "itg")}
        run(f"tp2_{objective}", weights, ParallelConfig(tensor_parallel=2), full, args.out)
    run("dp2_itc", {"itc": 1.0, "itm": 0.0, "itg": 0.0}, ParallelConfig(), full, args.out)
    pinit.destroy()


if __name__ == "__main__":
    main()
