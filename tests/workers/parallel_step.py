"""torchrun worker: one LLaVA debug training step under several TP x PP layouts.

For each layout it loads the same HF-format weights through the state-dict adapter, runs the
global batch (split over DP ranks, 1F1B over PP stages), and on rank 0 saves the per-token loss,
the gradients gathered to HF names, the logits of a forward pass (PP=1 layouts), the weights exported back to HF names and, with
--optimizer-step, the parameters after a megatron-core optimizer step. With --checkpoint the
last layout also saves a megatron-core dist checkpoint of the stepped model.
"""
import argparse
import os

import torch
from safetensors.torch import load_file

from megavlm.config.model import ParallelConfig
from megavlm.config.schema import with_overrides
from megavlm.data.synthetic import synthetic_batches
from megavlm.models.registry import flavor_config, get_family
from megavlm.parallel import init as pinit
from megavlm.parallel.gather import gather_shards, local_grads
from megavlm.training.build import build_model, load_local_state, wrap_ddp
from megavlm.models.common.layer_specs import lm_head
from megavlm.training.step import configure_schedule, forward_backward, lm_loss_fn


def make_optimizer(model_chunks):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.01, clip_grad=1.0, params_dtype=torch.float32)
    return get_megatron_optimizer(config, model_chunks)


def step_and_collect(ddp, optimizer, batches, loss_fn, seq_length, ctx) -> dict:
    """Forward/backward over ``batches``, then (with an optimizer) one step. Returns the loss,
    token count, the raw gradients (before clipping) and the stepped parameters, all gathered as
    {(tp, pp): local dict} on rank 0."""
    model = ddp.module
    ddp.zero_grad_buffer()
    step = forward_backward([ddp], batches, loss_fn, seq_length, 1)
    out = {"loss": step.losses["lm_loss"], "tokens": step.tokens,
           "grads": gather_shards(local_grads(model), ctx.tp_rank, ctx.pp_rank, ctx.dp_rank)}
    if optimizer is not None:
        _, grad_norm, _ = optimizer.step()
        out["grad_norm"] = float(grad_norm)
        out["params"] = gather_shards(model.state_dict(), ctx.tp_rank, ctx.pp_rank, ctx.dp_rank)
    return out


def named_results(adapter, collected: dict) -> dict:
    """Gathered {(tp, pp): tensors} -> HF names (whole models) and full-form LoRA tensors."""
    out = {}
    for key, value in collected.items():
        if not isinstance(value, dict):
            out[key] = value
            continue
        full = adapter.plan.unshard(value)
        out[f"lora_{key}"] = {k: v for k, v in full.items() if ".lora." in k}
        whole = "vision.patch_embed.weight" in full  # LoRA runs have no gradient for the frozen parts
        out[key] = adapter.megavlm_to_hf(value) if whole else {k: v for k, v in full.items() if ".lora." not in k}
    return out


def add_lora(model, adapter, path, ctx):
    """LoRA on every target (connector + adapters train), adapter weights from a full-form file."""
    from megavlm.config.recipe import LoRAConfig, StageConfig
    from megavlm.training.stages import apply_stage

    full = load_file(path)
    targets = sorted({k.split(".lora.")[1].split(".")[0] for k in full})
    apply_stage(model, StageConfig(trainable=["connector", "lora"], lora=LoRAConfig(rank=4, alpha=8, targets=targets)))
    local = adapter.plan.shard(full, ctx.tp_rank, ctx.pp_rank)
    missing, unexpected = model.load_state_dict(local, strict=False)
    assert not unexpected, unexpected


def run_layout(args, tp, pp, hf_weights, save_checkpoint=False):
    parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp)
    ctx = pinit.initialize(parallel, seed=args.seed)
    pgs = pinit.process_groups()
    cfg = with_overrides(flavor_config("llava", "debug"), args.override)
    adapter = get_family("llava").adapter_cls(cfg, tp_size=tp, pp_size=pp)
    model = build_model(cfg, parallel, ctx, pgs)
    load_local_state(model, adapter.hf_to_megavlm(hf_weights, ctx.tp_rank, ctx.pp_rank))
    if args.lora_init:
        add_lora(model, adapter, args.lora_init, ctx)
    ddp = wrap_ddp(model)
    configure_schedule([ddp])

    batches = synthetic_batches(cfg, args.samples, args.seq_length, micro_batch_size=1, seed=args.seed)
    mine = batches[ctx.dp_rank::ctx.dp_size]
    loss_fn = lm_loss_fn(lm_head(cfg, pgs.tp, model.output_weight))
    result = {"layout": (tp, pp)}
    loaded = gather_shards(model.state_dict(), ctx.tp_rank, ctx.pp_rank, ctx.dp_rank)
    if ctx.is_main:
        result["exported"] = adapter.megavlm_to_hf(loaded)
    if pp == 1:  # logits for the HF parity check: gather the vocab shards over TP
        with torch.no_grad():
            batch = batches[1]
            logits = model(batch["input_ids"], images=batch["images"], images_per_sample=batch["images_per_sample"])
        parts = [torch.empty_like(logits) for _ in range(tp)]
        torch.distributed.all_gather(parts, logits.contiguous(), group=pgs.tp)
        result["logits"] = torch.cat(parts, -1)[..., : cfg.language.vocab_size]

    optimizer = make_optimizer([ddp]) if args.optimizer_step else None
    collected = step_and_collect(ddp, optimizer, mine, loss_fn, args.seq_length, ctx)
    if ctx.is_main:
        result.update(named_results(adapter, collected))

    if save_checkpoint:
        from megatron.core import dist_checkpointing

        os.makedirs(args.checkpoint, exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), args.checkpoint)
    if ctx.is_main:
        torch.save(result, os.path.join(args.out, f"tp{tp}_pp{pp}.pt"))
    torch.distributed.barrier()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--init", required=True, help="HF-format safetensors with the initial weights")
    parser.add_argument("--layouts", default="2x1,1x2,2x2", help="comma-separated TPxPP")
    parser.add_argument("--out", required=True)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--optimizer-step", action="store_true")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--override", action="append", default=[], help="model config key=value")
    parser.add_argument("--lora-init", default=None, help="safetensors of full-form LoRA tensors to train")
    args = parser.parse_args()
    hf_weights = load_file(args.init)
    layouts = args.layouts.split(",")
    for i, layout in enumerate(layouts):
        tp, pp = (int(x) for x in layout.split("x"))
        run_layout(args, tp, pp, hf_weights, save_checkpoint=bool(args.checkpoint) and i == len(layouts) - 1)
    pinit.destroy()


if __name__ == "__main__":
    main()
