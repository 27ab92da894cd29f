"""torchrun worker (2 processes): every layout of tests/hf_variants.py at TP=2. Each rank builds the
same random HF model (same seed), loads its own shard, and the vocab-sharded logits are gathered
over TP; rank 0 compares them with HF's, exports the gathered shards back to HF names and writes
{variant: max |logits diff|, mismatching tensors, the exported model's max |logits diff|}; then, per
family, LoRA and QLoRA adapters trained at TP=2 exported for PEFT reproduce megavlm's logits."""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: the repository root for tests.*

from megavlm.config.model import ParallelConfig
from megavlm.models.registry import get_family
from megavlm.parallel import init as pinit
from megavlm.parallel.gather import gather_shards
from megavlm.training.build import build_model, load_local_state
from tests import hf_variants


def check(name: str, ctx, pgs, parallel: ParallelConfig) -> dict | None:
    cfg = hf_variants.variant_config(name)
    hf = hf_variants.hf_reference(cfg, seed=3)
    reference = dict(hf.state_dict())
    adapter = get_family(cfg.family).adapter_cls(cfg, tp_size=ctx.tp_size)
    model = build_model(cfg, parallel, ctx, pgs).eval()
    load_local_state(model, adapter.hf_to_megavlm(reference, ctx.tp_rank, 0))
    b = hf_variants.batch(cfg)
    with torch.no_grad():
        logits = model(b["input_ids"], images=b["images"], images_per_sample=b["images_per_sample"]).contiguous()
    parts = [torch.empty_like(logits) for _ in range(ctx.tp_size)]
    torch.distributed.all_gather(parts, logits, group=pgs.tp)
    shards = gather_shards(model.state_dict(), ctx.tp_rank, 0, ctx.dp_rank)
    if not ctx.is_main:
        return None
    ref = hf_variants.hf_logits(cfg, hf, b)
    ours = torch.cat(parts, -1)[..., : cfg.language.vocab_size].float()
    exported = adapter.megavlm_to_hf(shards)
    again = hf_variants.hf_logits(cfg, hf_variants.exported_hf_model(cfg, exported, reference), b)
    return {"logits_diff": (ours - ref).abs().max().item(),
            "export_mismatches": hf_variants.export_mismatches(exported, reference),
            "export_logits_diff": (again - ref).abs().max().item()}


def check_peft(name: str, quantize: bool, ctx, pgs, parallel: ParallelConfig, root: Path) -> float | None:
    from megavlm.peft.lora import full_precision_state

    cfg = hf_variants.variant_config(name)
    adapter = get_family(cfg.family).adapter_cls(cfg, tp_size=ctx.tp_size)
    model = build_model(cfg, parallel, ctx, pgs).eval()
    load_local_state(model, adapter.hf_to_megavlm(dict(hf_variants.hf_reference(cfg, seed=4).state_dict()),
                                                  ctx.tp_rank, 0))
    lora = hf_variants.add_lora(model, cfg, quantize, ctx.tp_rank)
    b = hf_variants.batch(cfg)
    with torch.no_grad():
        logits = model(b["input_ids"], images=b["images"], images_per_sample=b["images_per_sample"]).contiguous()
    parts = [torch.empty_like(logits) for _ in range(ctx.tp_size)]
    torch.distributed.all_gather(parts, logits, group=pgs.tp)
    shards = gather_shards(full_precision_state(model), ctx.tp_rank, 0, ctx.dp_rank)
    if not ctx.is_main:
        return None
    ours = torch.cat(parts, -1)[..., : cfg.language.vocab_size].float()
    ref = hf_variants.peft_logits(cfg, lora, shards, adapter, root / f"{name}-{quantize}", b)
    return (ours - ref).abs().max().item()


def whole_grads(name: str, ctx, pgs, parallel: ParallelConfig, checkpoint: str | None = None) -> dict:
    """Gradients of the parts kept whole on every TP rank (all trainable) for a loss on all logits,
    in full form; and whether this rank counts them in the gradient norm. Also run by the test at TP=1."""
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate

    from megavlm.parallel.gather import local_grads

    cfg = hf_variants.variant_config(name)
    adapter = get_family(cfg.family).adapter_cls(cfg, tp_size=ctx.tp_size)
    model = build_model(cfg, parallel, ctx, pgs)
    load_local_state(model, adapter.hf_to_megavlm(dict(hf_variants.hf_reference(cfg, seed=5).state_dict()),
                                                  ctx.tp_rank, 0))
    if checkpoint:
        from megavlm.training.checkpoint import save_model

        save_model(model, cfg, checkpoint)
    b = hf_variants.batch(cfg)
    logits = model(b["input_ids"], images=b["images"], images_per_sample=b["images_per_sample"])
    if ctx.tp_size > 1:
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits, group=pgs.tp)
    logits[..., : cfg.language.vocab_size].float().pow(2).mean().backward()
    prefixes = hf_variants.WHOLE_MODULES[name]
    grads = {k: v for k, v in local_grads(model).items() if k.startswith(prefixes)}
    counted = [param_is_not_tensor_parallel_duplicate(p, pgs.tp) for k, p in model.named_parameters()
               if k.startswith(prefixes)]
    shards = gather_shards(grads, ctx.tp_rank, 0, ctx.dp_rank)
    return {"grads": adapter.plan.unshard(shards) if ctx.is_main else None, "counted": counted}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="results JSON")
    args = parser.parse_args()
    parallel = ParallelConfig(tensor_parallel=2)
    ctx = pinit.initialize(parallel, seed=0)
    pgs = pinit.process_groups()
    results = {"variants": {name: check(name, ctx, pgs, parallel) for name in hf_variants.VARIANTS},
               "peft": {f"{name}/{'qlora' if quantize else 'lora'}": check_peft(name, quantize, ctx, pgs, parallel,
                                                                               Path(args.out).parent)
                        for name in hf_variants.PEFT_VARIANTS for quantize in (False, True)}}
    results["whole_counted_by_rank"] = {}
    for i, name in enumerate(hf_variants.WHOLE_MODULES):
        whole = whole_grads(name, ctx, pgs, parallel, str(Path(args.out).parent / f"{name}_ckpt") if i == 0 else None)
        counted = [None] * ctx.world_size
        torch.distributed.all_gather_object(counted, whole["counted"])
        results["whole_counted_by_rank"][name] = counted
        if ctx.is_main:
            torch.save(whole["grads"], Path(args.out).parent / f"{name}_grads.pt")
    if ctx.is_main:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        print(json.dumps(results, indent=1))
    torch.distributed.barrier()
    pinit.destroy()


if __name__ == "__main__":
    main()
