#!/usr/bin/env python
"""GPU check for the foundation: LLaVA forward/backward in bf16 with the local spec.

Runs the ``debug`` and ``llava-1b`` flavors (every component trainable, so the whole backward
runs), checks the loss is finite and near ln(vocab) at random init, and prints a table of loss,
step time and peak memory. Usage (on the GPU machine, after tools/gpu/setup_gpu_env.sh):

    python tools/gpu/llava_smoke.py [--steps 5] [--batch 2] [--seq 2048]
"""
from __future__ import annotations

import argparse
import math
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def run(flavor: str, batch: int, seq: int, steps: int) -> dict:
    from megavlm.config.model import ParallelConfig
    from megavlm.data.synthetic import synthetic_batches
    from megavlm.models.registry import flavor_config
    from megavlm.parallel import init as pinit
    from megavlm.training.build import build_model, wrap_ddp
    from megavlm.models.common.layer_specs import lm_head
    from megavlm.training.step import configure_schedule, forward_backward, lm_loss_fn

    ctx = pinit.initialize(ParallelConfig(), seed=0)
    pgs = pinit.process_groups()
    cfg = flavor_config("llava", flavor)
    seq = min(seq, cfg.language.max_seq_len)
    model = build_model(cfg, ParallelConfig(), ctx, pgs, dtype=torch.bfloat16)
    ddp = wrap_ddp(model)
    configure_schedule([ddp])
    batches = synthetic_batches(cfg, batch, seq, micro_batch_size=batch, seed=0, image_pattern=(1,), device=ctx.device)
    loss_fn = lm_loss_fn(lm_head(cfg, pgs.tp, model.output_weight))
    torch.cuda.reset_peak_memory_stats()
    times, loss = [], None
    for _ in range(steps):
        ddp.zero_grad_buffer()
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = forward_backward([ddp], batches, loss_fn, seq, batch)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        loss = result.losses["lm_loss"]
    grads_finite = all(torch.isfinite(p.main_grad).all() for p in model.parameters() if hasattr(p, "main_grad"))
    step = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0]
    out = {"flavor": flavor, "batch": f"{batch}x{seq}", "loss": loss, "ln_vocab": math.log(cfg.language.vocab_size),
           "step_ms": 1000 * step, "tokens_per_s": batch * seq / step,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "grads_finite": grads_finite,
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    del ddp, model
    torch.cuda.empty_cache()
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--flavors", default="debug,llava-1b")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this check needs a GPU"
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    rows = []
    for flavor in args.flavors.split(","):
        seq = 256 if flavor == "debug" else args.seq
        rows.append(run(flavor, args.batch, seq, args.steps))
    header = f"{'flavor':<10} {'batch':>9} {'params(M)':>9} {'loss':>7} {'ln(V)':>6} {'step ms':>8} {'tok/s':>9} {'peak GiB':>8} {'grads ok':>8}"
    print(header)
    for r in rows:
        print(f"{r['flavor']:<10} {r['batch']:>9} {r['params_m']:>9.1f} {r['loss']:>7.3f} {r['ln_vocab']:>6.2f} "
              f"{r['step_ms']:>8.1f} {r['tokens_per_s']:>9.0f} {r['peak_gib']:>8.2f} {str(r['grads_finite']):>8}")
    bad = [r["flavor"] for r in rows if not (math.isfinite(r["loss"]) and abs(r["loss"] - r["ln_vocab"]) < 2.0
                                             and r["grads_finite"])]
    if bad:
        raise SystemExit(f"FAILED: {bad}: loss not finite / far from ln(vocab) at init, or non-finite gradients")
    print("OK")


if __name__ == "__main__":
    main()
