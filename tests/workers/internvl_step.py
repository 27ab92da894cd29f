"""torchrun worker (2 processes): one InternVL debug training step with everything trainable
(InternViT with full-width QK-norm and LayerScale, the pixel-shuffle MLP, the Qwen2-style LLM)
under TP=2 with activation recompute, from HF InternVL weights; rank 0 saves the loss and the
gradients in full form, and the weights go to a dist checkpoint. ``run`` is also called in the
test process for the one-process reference."""
import argparse
import os

import torch
from safetensors.torch import load_file

from megavlm.config.model import ParallelConfig
from megavlm.config.recipe import StageConfig
from megavlm.data.synthetic import synthetic_batches
from megavlm.models.common.layer_specs import lm_head
from megavlm.models.registry import flavor_config, get_family
from megavlm.parallel import init as pinit
from megavlm.parallel.gather import gather_shards, local_grads
from megavlm.training.build import build_model, load_local_state, wrap_ddp
from megavlm.training.stages import apply_stage
from megavlm.training.step import configure_schedule, forward_backward, lm_loss_fn

CFG = flavor_config("internvl", "debug")
SEQ = 24 + 2 * CFG.image_tokens


def batches() -> list[dict]:
    return synthetic_batches(CFG, 4, SEQ, micro_batch_size=2, seed=11, image_pattern=(2, 1, 0, 1))


def run(name: str, parallel: ParallelConfig, hf: dict, out: str, recompute: bool = False,
        checkpoint: str | None = None) -> None:
    ctx = pinit.initialize(parallel, seed=0)
    pgs = pinit.process_groups()
    adapter = get_family("internvl").adapter_cls(CFG, tp_size=ctx.tp_size, pp_size=ctx.pp_size)
    model = build_model(CFG, parallel, ctx, pgs, recompute=recompute)
    load_local_state(model, adapter.hf_to_megavlm(hf, ctx.tp_rank, ctx.pp_rank))
    if checkpoint:
        from megavlm.training.checkpoint import save_model

        save_model(model, CFG, checkpoint)
    apply_stage(model, StageConfig(trainable=["vision", "connector", "llm"]))
    ddp = wrap_ddp(model)
    configure_schedule([ddp])
    ddp.zero_grad_buffer()
    loss_fn = lm_loss_fn(lm_head(CFG, pgs.tp, model.output_weight if ctx.is_last_stage else None))
    step = forward_backward([ddp], batches(), loss_fn, SEQ, 2)
    grads = gather_shards(local_grads(model), ctx.tp_rank, ctx.pp_rank, ctx.dp_rank)
    if ctx.is_main:
        torch.save({"loss": step.losses["lm_loss"], "tokens": step.tokens, "grads": adapter.plan.unshard(grads)},
                   os.path.join(out, f"{name}.pt"))
    torch.distributed.barrier()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--init", required=True, help="HF InternVL safetensors")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    run("tp2", ParallelConfig(tensor_parallel=2), load_file(args.init), args.out, recompute=True,
        checkpoint=os.path.join(args.out, "ckpt_tp2"))
    pinit.destroy()


if __name__ == "__main__":
    main()
