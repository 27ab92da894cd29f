#!/usr/bin/env python
"""Packed-row attention: one varlen call vs one SDPA call per sample, forward + backward.

    python tools/benchmark_attention.py [--tokens 2048] [--samples 16] [--heads 16] [--kv-heads 4] [--dim 64]

Rows of ``--tokens`` tokens packed with ``--samples`` samples of random lengths, causal, GQA.
``varlen`` is what the local spec runs (torch's flash varlen kernel on GPUs in bf16; the padded
per-sample batch on CPUs); ``per-sample`` is the reference loop it replaced.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from megavlm.models.common.attention import reference_varlen_attention, varlen_attention  # noqa: E402
from megavlm.training.bench import median, time_steps  # noqa: E402


def _lengths(tokens: int, samples: int, gen: torch.Generator) -> list[int]:
    weights = torch.rand(samples, generator=gen) + 0.2
    lengths = (weights / weights.sum() * tokens).long().clamp(min=1)
    lengths[-1] += tokens - int(lengths.sum())
    return lengths.tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    print(f"{args.tokens} tokens per row, {args.heads} heads ({args.kv_heads} KV), head dim {args.dim}, causal, "
          f"forward+backward, {device.type} {dtype}".replace("torch.", ""))
    print(f"{'samples':>8} {'per-sample ms':>14} {'varlen ms':>10} {'speed-up':>9}")
    for samples in args.samples:
        lengths = _lengths(args.tokens, samples, gen)
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), device=device)
        q, k, v = (torch.randn(args.tokens, h, args.dim, device=device, dtype=dtype, generator=None, requires_grad=True)
                   for h in (args.heads, args.kv_heads, args.kv_heads))
        times = {}
        for name, fn in (("loop", reference_varlen_attention), ("varlen", varlen_attention)):
            step = lambda fn=fn: fn(q, k, v, cu, cu, True, args.dim ** -0.5).sum().backward()  # noqa: E731
            times[name] = median(time_steps(step, args.steps, warmup=2)) * 1e3
        print(f"{samples:>8} {times['loop']:>14.2f} {times['varlen']:>10.2f} {times['loop'] / times['varlen']:>8.2f}x")


if __name__ == "__main__":
    main()
