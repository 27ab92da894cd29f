"""torchrun worker (2 processes): one Flamingo debug training step (resampler + gated
cross-attention train, ViT and LLM frozen) under TP=2 and PP=2, from the same HF IDEFICS weights
and batch; rank 0 saves the loss, the gradients in full form and (TP=2) the gathered logits.
``run`` is also called in the test process for the one-process reference."""
import argparse
import os

import torch
from safetensors.torch import load_file

from megavlm.config.model import ParallelConfig
from megavlm.config.recipe import StageConfig
from megavlm.losses.lm_loss import IGNORE_INDEX
from megavlm.models.common.layer_specs import lm_head
from megavlm.models.registry import flavor_config, get_family
from megavlm.parallel import init as pinit
from megavlm.parallel.gather import gather_shards, local_grads
from megavlm.training.build import build_model, load_local_state, wrap_ddp
from megavlm.training.stages import apply_stage
from megavlm.training.step import configure_schedule, forward_backward, lm_loss_fn

CFG = flavor_config("flamingo", "debug")
SEQ = 24
# (sample, positions of its <image> markers): 0, 1 and 3 images, a marker first and a marker last
MARKERS = [[], [5], [0, 9, 16], [2, 23]]


def batches(micro_batch_size: int = 2, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    size, token = CFG.vision.image_size, CFG.image_token_id
    ids = torch.randint(10, CFG.language.vocab_size, (len(MARKERS), SEQ), generator=g)
    for row, positions in enumerate(MARKERS):
        ids[row, positions] = token
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = ids[:, 1:]
    labels[labels == token] = IGNORE_INDEX
    counts = torch.tensor([len(p) for p in MARKERS])
    images = torch.randn(int(counts.sum()), 3, size, size, generator=g)
    out, first = [], 0
    for start in range(0, len(MARKERS), micro_batch_size):
        n = int(counts[start:start + micro_batch_size].sum())
        out.append({"input_ids": ids[start:start + micro_batch_size], "labels": labels[start:start + micro_batch_size],
                    "images": images[first:first + n], "images_per_sample": counts[start:start + micro_batch_size]})
        first += n
    return out


def run(name: str, parallel: ParallelConfig, hf: dict, out: str, checkpoint: str | None = None) -> None:
    ctx = pinit.initialize(parallel, seed=0)
    pgs = pinit.process_groups()
    adapter = get_family("flamingo").adapter_cls(CFG, tp_size=ctx.tp_size, pp_size=ctx.pp_size)
    model = build_model(CFG, parallel, ctx, pgs)
    load_local_state(model, adapter.hf_to_megavlm(hf, ctx.tp_rank, ctx.pp_rank))
    apply_stage(model, StageConfig(trainable=["connector", "fusion"]))
    result = {}
    if ctx.pp_size == 1:
        with torch.no_grad():
            batch = batches()[1]
            logits = model(batch["input_ids"], images=batch["images"], images_per_sample=batch["images_per_sample"])
        parts = [torch.empty_like(logits) for _ in range(ctx.tp_size)]
        torch.distributed.all_gather(parts, logits.contiguous(), group=pgs.tp)
        result["logits"] = torch.cat(parts, -1)[..., : CFG.language.vocab_size]
    ddp = wrap_ddp(model)
    configure_schedule([ddp])
    ddp.zero_grad_buffer()
    loss_fn = lm_loss_fn(lm_head(CFG, pgs.tp, model.output_weight if ctx.is_last_stage else None))
    step = forward_backward([ddp], batches(), loss_fn, SEQ, 2)
    grads = gather_shards(local_grads(model), ctx.tp_rank, ctx.pp_rank, ctx.dp_rank)
    if checkpoint:   # the weights as loaded (no optimizer step ran): gated blocks on their own axis
        from megavlm.training.checkpoint import save_model

        save_model(model, CFG, checkpoint)
    if ctx.is_main:
        result.update(loss=step.losses["lm_loss"], tokens=step.tokens, grads=adapter.plan.unshard(grads))
        torch.save(result, os.path.join(out, f"{name}.pt"))
    torch.distributed.barrier()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--init", required=True, help="HF IDEFICS safetensors")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    hf = load_file(args.init)
    run("tp2", ParallelConfig(tensor_parallel=2), hf, args.out, checkpoint=os.path.join(args.out, "ckpt_tp2"))
    run("pp2", ParallelConfig(pipeline_parallel=2), hf, args.out, checkpoint=os.path.join(args.out, "ckpt_pp2"))
    pinit.destroy()


if __name__ == "__main__":
    main()
