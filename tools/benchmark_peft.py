#!/usr/bin/env python
"""Stage 3 full fine-tuning vs LoRA vs QLoRA: peak memory and step time, as a table.

    python tools/benchmark_peft.py [--flavor debug] [--override language.num_layers=8 ...] [--steps 5]

Each variant runs in a fresh process (single rank; GPU when present, else CPU) on synthetic
LLaVA batches: the vision tower frozen, the connector trainable, and the LLM either fully
trainable, or frozen with rank-16 adapters on q/k/v/o (LoRA), or frozen in NF4 (QLoRA). Reported:
the bytes of weights, gradient buffers and optimizer state (exact), the peak memory (CUDA
allocator peak on GPUs; peak RSS growth on CPUs, which includes allocator slack) and the median
step time.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys

VARIANTS = {
    "full": {"trainable": ["connector", "llm"]},
    "lora": {"trainable": ["connector", "lora"], "lora": {"rank": 16, "alpha": 16, "targets": ["q", "k", "v", "o"]}},
    "qlora": {"trainable": ["connector", "lora"],
              "lora": {"rank": 16, "alpha": 16, "targets": ["q", "k", "v", "o"], "quantize_base": "nf4"}},
}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_variant(args) -> dict:
    import torch

    from megavlm.config.recipe import StageConfig
    from megavlm.config.schema import from_dict, with_overrides
    from megavlm.models.registry import flavor_config
    from megavlm.peft.nf4 import nf4_bytes
    from megavlm.training.bench import build_harness, ours_step, time_steps

    cfg = with_overrides(flavor_config("llava", args.flavor), args.override)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    start_rss = _rss_mib()
    stage = from_dict(StageConfig, dict(VARIANTS[args.variant], name=args.variant))
    h = build_harness(cfg, stage, args.batch, args.seq, dtype)
    model, ddp, optimizer = h.model, h.ddp, h.optimizer
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = time_steps(ours_step(h), args.steps, warmup=0)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(nf4_bytes(m.weight_nf4) for m in model.modules() if getattr(m, "weight_nf4", None) is not None)
    grads = sum(b.grad_data.numel() * b.grad_data.element_size() for b in ddp.buffers)
    state = 0
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        for st in inner.optimizer.state.values():
            state += sum(t.numel() * t.element_size() for t in st.values() if torch.is_tensor(t))
        state += sum(p.numel() * p.element_size() for g in getattr(inner, "fp32_from_float16_groups", []) for p in g)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else _rss_mib() - start_rss)
    return {"variant": args.variant, "trainable_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
            "weights_mib": weights / 2**20, "grads_mib": grads / 2**20, "optimizer_mib": state / 2**20,
            "peak_mib": peak, "step_s": statistics.median(times[1:] or times),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavor", default="debug")
    parser.add_argument("--override", action="append", default=[], help="model config key=value")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:  # child process: one variant, JSON on the last line
        print(json.dumps(run_variant(args)))
        return
    rows = []
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant, "--flavor", args.flavor, "--batch", str(args.batch),
               "--seq", str(args.seq), "--steps", str(args.steps)] + [f"--override={o}" for o in args.override]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"stage 3 on {rows[0]['device']}: flavor {args.flavor} {' '.join(args.override)}, batch {args.batch} x {args.seq}")
    print(f"{'variant':<7} {'trainable M':>11} {'weights MiB':>11} {'grads MiB':>9} {'optim MiB':>9} {'peak MiB':>9} {'step s':>7}")
    for r in rows:
        print(f"{r['variant']:<7} {r['trainable_m']:>11.2f} {r['weights_mib']:>11.1f} {r['grads_mib']:>9.1f} "
              f"{r['optimizer_mib']:>9.1f} {r['peak_mib']:>9.1f} {r['step_s']:>7.3f}")


if __name__ == "__main__":
    main()
