"""torchrun worker (2 processes), one launch for every multi-process check of Fuyu and PaliGemma:

* TP=2 (and TP=2 with sequence parallelism): each rank builds the same random HF model (same
  seed) and loads its own shard; the vocab-sharded logits are gathered over TP and rank 0
  compares them with HF's, exports the gathered shards back to HF names and compares the
  exported model's logits; the TP=2 model is saved as a dist checkpoint (loaded at TP=1 by the test);
* PP=2: one training step's loss and gradients (gathered to full megavlm names), to be compared
  by the test with one process's (``pp_step`` also runs there). Fuyu runs padded rows through the
  fused linear cross-entropy kernel; PaliGemma runs packed rows (each sample's prefix block kept).
  Then greedy generation over the two stages, with and without the KV cache.

Rank 0 writes {"tp2": {case: {batch: diffs}}} as JSON and each PP result as a .pt file."""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: the repository root for tests.*

from megavlm.config.model import ParallelConfig
from megavlm.config.schema import with_overrides
from megavlm.models.registry import get_family
from megavlm.parallel import init as pinit
from megavlm.parallel.gather import gather_shards
from megavlm.training.build import build_model, load_local_state
from tests import fuyu_paligemma_cases as cases
from tests import hf_variants

# case -> (model overrides for the pipeline run, packed rows)
PP_RUNS = {"fuyu": (["kernels.fused_linear_cross_entropy=true"], False), "paligemma": ([], True)}


def tp_check(name: str, ctx, pgs, parallel, checkpoint: Path | None = None) -> dict | None:
    cfg = cases.case_config(name)
    hf = cases.hf_reference(cfg)
    reference = dict(hf.state_dict())
    adapter = get_family(cfg.family).adapter_cls(cfg, tp_size=ctx.tp_size)
    model = build_model(cfg, parallel, ctx, pgs).eval()
    load_local_state(model, adapter.hf_to_megavlm(reference, ctx.tp_rank, 0))
    if checkpoint is not None:
        from megavlm.training.checkpoint import save_model

        save_model(model, cfg, checkpoint)
    shards = gather_shards(model.state_dict(), ctx.tp_rank, 0, ctx.dp_rank)
    exported_model = None
    if ctx.is_main:
        exported = adapter.megavlm_to_hf(shards)
        result = {"export_mismatches": hf_variants.export_mismatches(exported, reference)}
        exported_model = hf_variants.exported_hf_model(cfg, exported, reference)
    for batch_name, batch in cases.batches_for(name).items():
        if parallel.sequence_parallel and batch["input_ids"].shape[1] % ctx.tp_size:
            continue   # sequence parallelism splits rows evenly
        with torch.no_grad():
            logits = model(batch["input_ids"], **cases.model_inputs(batch)).contiguous()
        parts = [torch.empty_like(logits) for _ in range(ctx.tp_size)]
        torch.distributed.all_gather(parts, logits, group=pgs.tp)
        if ctx.is_main:
            ours = torch.cat(parts, -1)[..., : cfg.language.vocab_size].float()
            ref = cases.hf_logits(cfg, hf, batch)
            again = cases.hf_logits(cfg, exported_model, batch)
            result[batch_name] = {"hf_to_megavlm": (ours - ref).abs().max().item(),
                                  "megavlm_to_hf": (again - ref).abs().max().item()}
    return result if ctx.is_main else None


def pp_step(name: str, ctx, pgs, parallel, overrides=(), packed: bool = False) -> dict:
    """One forward/backward of the case's four samples under ``parallel``: the per-token loss and,
    on rank 0, the gradients in full megavlm names (also run in one process by the test)."""
    from megavlm.models.common.layer_specs import lm_head
    from megavlm.training.build import wrap_ddp
    from megavlm.training.step import configure_schedule, lm_loss_fn
    from tests.workers.parallel_step import step_and_collect

    cfg = with_overrides(cases.case_config(name), list(overrides))
    adapter = get_family(cfg.family).adapter_cls(cfg, tp_size=ctx.tp_size, pp_size=ctx.pp_size)
    model = build_model(cfg, parallel, ctx, pgs)
    load_local_state(model, adapter.hf_to_megavlm(dict(cases.hf_reference(cfg, seed=5).state_dict()),
                                                  ctx.tp_rank, ctx.pp_rank))
    ddp = wrap_ddp(model)
    configure_schedule([ddp])
    batches = cases.pp_batches(cfg, packed)
    loss_fn = lm_loss_fn(lm_head(cfg, pgs.tp, model.output_weight if ctx.is_last_stage else None))
    out = step_and_collect(ddp, None, batches, loss_fn, cases.PP_SEQ, ctx)
    grads = adapter.plan.unshard(out["grads"]) if ctx.is_main else None
    return {"loss": out["loss"], "tokens": out["tokens"], "grads": grads}


def pp_generation(name: str, ctx, pgs, parallel) -> dict:
    cfg = cases.case_config(name)
    adapter = get_family(cfg.family).adapter_cls(cfg, pp_size=ctx.pp_size)
    model = build_model(cfg, parallel, ctx, pgs).eval()
    load_local_state(model, adapter.hf_to_megavlm(dict(cases.hf_reference(cfg, seed=6).state_dict()), 0, ctx.pp_rank))
    return {"cached": cases.generate_case(model, cfg, cache=True),
            "uncached": cases.generate_case(model, cfg, cache=False)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="directory for the results")
    args = parser.parse_args()
    out = Path(args.out)
    results = {"tp2": {}, "tp2_sp": {}}
    for key, parallel in (("tp2", ParallelConfig(tensor_parallel=2)),
                          ("tp2_sp", ParallelConfig(tensor_parallel=2, sequence_parallel=True))):
        ctx = pinit.initialize(parallel, seed=0)
        for name in cases.TP2_CASES:
            checkpoint = out / f"{name}_tp2_ckpt" if key == "tp2" else None
            results[key][name] = tp_check(name, ctx, pinit.process_groups(), parallel, checkpoint)
    parallel = ParallelConfig(pipeline_parallel=2)
    ctx = pinit.initialize(parallel, seed=0)
    for name, (overrides, packed) in PP_RUNS.items():
        result = pp_step(name, ctx, pinit.process_groups(), parallel, overrides, packed)
        if ctx.is_main:
            torch.save(result, out / f"pp2_{name}.pt")
    results["pp2_generation"] = {name: pp_generation(name, ctx, pinit.process_groups(), parallel)
                                 for name in cases.TP2_CASES}
    if ctx.is_main:
        (out / "results.json").write_text(json.dumps(results, indent=2))
        print(json.dumps(results, indent=1))
    torch.distributed.barrier()
    pinit.destroy()


if __name__ == "__main__":
    main()
