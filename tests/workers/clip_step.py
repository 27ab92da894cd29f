"""torchrun worker (2 processes), one launch for every multi-process CLIP check:

* HF parity at TP=2: each rank builds the same random HF model (same seed), loads its shard of
  every layout in tests/clip_cases.py; rank 0 compares the logits with HF's and exports the
  gathered shards back to HF names;
* the objectives (clip, siglip) under TP=2 (whole batch on each rank) and DP=2 (half the batch
  per rank, negatives gathered; also 4 + 2 rows, and 6 + 0 as when a rank's samples were all
  skipped), from the same full-form weights; rank 0 saves the loss and the gradients gathered to
  full form, for the test to compare with one process over the whole batch.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: the repository root for tests.*

from megavlm.config.model import ParallelConfig
from megavlm.data.synthetic import synthetic_pairs
from megavlm.models.registry import flavor_config, get_family
from megavlm.parallel import init as pinit
from megavlm.parallel.gather import gather_shards, local_grads
from megavlm.training.build import build_model, load_local_state, wrap_ddp
from megavlm.training.step import configure_schedule, forward_backward
from megavlm.training.tasks import ContrastiveTask
from tests import clip_cases

FAMILY = get_family("clip")
OBJECTIVE_FLAVORS = {"clip": "debug", "siglip": "debug-siglip"}
SAMPLES = 6
DP_SPLITS = {"dp2": (3, 3), "dp2_uneven": (4, 2), "dp2_empty": (6, 0)}   # rows of rank 0, rank 1


def parity(name: str, ctx, pgs, parallel: ParallelConfig) -> dict | None:
    cfg = clip_cases.variant_config(name)
    hf = clip_cases.hf_reference(cfg, seed=3)
    reference = dict(hf.state_dict())
    adapter = FAMILY.adapter_cls(cfg, tp_size=ctx.tp_size)
    model = build_model(cfg, parallel, ctx, pgs).eval()
    load_local_state(model, adapter.hf_to_megavlm(reference, ctx.tp_rank, 0))
    batch = clip_cases.pairs(cfg)
    ours = clip_cases.megavlm_logits(model, batch)     # whole on every TP rank
    shards = gather_shards(model.state_dict(), ctx.tp_rank, 0, ctx.dp_rank)
    if not ctx.is_main:
        return None
    ref = clip_cases.hf_logits(cfg, hf, batch)
    exported = adapter.megavlm_to_hf(shards)
    again = clip_cases.hf_logits(cfg, clip_cases.exported_hf_model(cfg, exported), batch)
    return {"logits_diff": (ours - ref).abs().max().item(),
            "export_mismatches": [k for k, v in exported.items() if not torch.equal(v, reference[k])],
            "export_missing": sorted(set(reference) - set(exported)),
            "export_logits_diff": (again - ref).abs().max().item()}


def objective_step(loss: str, parallel: ParallelConfig, full: dict, out: str, tag: str,
                   split: tuple[int, ...] | None = None) -> None:
    """One forward-backward of the whole batch, ``split`` rows per DP rank (default: even); rank 0
    saves loss and grads."""
    ctx = pinit.initialize(parallel, seed=0)
    cfg = flavor_config("clip", OBJECTIVE_FLAVORS[loss])
    adapter = FAMILY.adapter_cls(cfg, tp_size=ctx.tp_size)
    model = build_model(cfg, parallel, ctx, pinit.process_groups())
    load_local_state(model, adapter.plan.shard(full, ctx.tp_rank, 0))
    ddp = wrap_ddp(model)
    configure_schedule([ddp])
    data = batch_for(cfg)
    split = split or (SAMPLES // ctx.dp_size,) * ctx.dp_size
    start = sum(split[:ctx.dp_rank])
    mine = {k: v[start:start + split[ctx.dp_rank]] for k, v in data.items()}
    task = ContrastiveTask.__new__(ContrastiveTask)
    task.objective = model.objective
    ddp.zero_grad_buffer()
    result = forward_backward([ddp], [mine], task.loss_fn(), cfg.language.max_seq_len, max(split))
    grads = gather_shards(local_grads(model), ctx.tp_rank, 0, ctx.dp_rank)
    if ctx.is_main:
        torch.save({"losses": result.losses, "grads": adapter.plan.unshard(grads)}, os.path.join(out, f"{tag}.pt"))
    torch.distributed.barrier()


def batch_for(cfg) -> dict:
    return synthetic_pairs(cfg, SAMPLES, seed=11)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    parallel = ParallelConfig(tensor_parallel=2)
    ctx = pinit.initialize(parallel, seed=0)
    results = {name: parity(name, ctx, pinit.process_groups(), parallel) for name in clip_cases.VARIANTS}
    if ctx.is_main:
        Path(args.out, "parity_tp2.json").write_text(json.dumps(results, indent=1))
    for loss in OBJECTIVE_FLAVORS:
        full = load_file(os.path.join(args.out, f"{loss}_init.safetensors"))
        objective_step(loss, ParallelConfig(tensor_parallel=2), full, args.out, f"{loss}_tp2")
        for name, split in DP_SPLITS.items():
            objective_step(loss, ParallelConfig(), full, args.out, f"{loss}_{name}", split)
    pinit.destroy()


if __name__ == "__main__":
    main()
