#!/usr/bin/env python
"""GPU check of the Triton kernels: correctness against the references, then time and peak memory
against eager PyTorch and torch.compile at LLaVA-1.5 shapes, bf16, forward + backward.

    python tools/gpu/bench_kernels.py [--quick]

Shapes (issue targets in brackets):
  cross-entropy          logits 16384 x 32000                      [>= 1.5x eager]
  linear + cross-entropy hidden 16384 x 4096, weight 32000 x 4096   [peak <= 1/4 eager, time <= eager]
  connector              8 x 576 tokens, 1024 -> 4096 -> 4096       [>= 1.3x eager]
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from megavlm.kernels.cross_entropy import triton_cross_entropy
from megavlm.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from megavlm.kernels.fused_mlp import fused_mlp, reference_mlp

DEV = "cuda"
BF16 = torch.bfloat16


def bench(fn, reps: int) -> tuple[float, float]:
    """(median ms, peak MiB above the inputs) of fn() (forward + backward)."""
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), peak


def eager_ce(logits, targets):
    return F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")


def eager_linear_ce(h, w, targets):
    return F.cross_entropy((h @ w.t()).float(), targets, ignore_index=-100, reduction="sum")


def cross_entropy_cases(n, v):
    logits = torch.randn(n, v, device=DEV, dtype=BF16)
    targets = torch.randint(0, v, (n,), device=DEV)
    targets[::7] = -100
    compiled = torch.compile(eager_ce)

    def run(impl):
        def step():
            x = logits.detach().requires_grad_()
            impl(x, targets).backward()
        return step

    ours = lambda x, t: triton_cross_entropy(x, t, inplace_backward=True).sum()  # noqa: E731
    check = logits[:512].detach().requires_grad_(), logits[:512].detach().requires_grad_()
    eager_ce(check[0], targets[:512]).backward()
    ours(check[1], targets[:512]).backward()
    err = (check[0].grad.float() - check[1].grad.float()).abs().max().item()
    return [("eager", run(eager_ce)), ("torch.compile", run(compiled)), ("triton", run(ours))], err


def linear_ce_cases(n, h, v):
    hidden = torch.randn(n, h, device=DEV, dtype=BF16)
    weight = torch.randn(v, h, device=DEV, dtype=BF16) * 0.02
    targets = torch.randint(0, v, (n,), device=DEV)
    compiled = torch.compile(eager_linear_ce)

    def run(impl):
        def step():
            a, b = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
            impl(a, b, targets).backward()
        return step

    ours = lambda a, b, t: fused_linear_cross_entropy(a, b, t, chunk_size=4096)  # noqa: E731
    a1, b1 = hidden[:1024].detach().requires_grad_(), weight.detach().requires_grad_()
    a2, b2 = hidden[:1024].detach().requires_grad_(), weight.detach().requires_grad_()
    eager_linear_ce(a1, b1, targets[:1024]).backward()
    ours(a2, b2, targets[:1024]).backward()
    err = (a1.grad.float() - a2.grad.float()).abs().max().item()
    return [("eager", run(eager_linear_ce)), ("torch.compile", run(compiled)), ("triton chunked", run(ours))], err


def connector_cases(tokens, d_in, d_hidden):
    x = torch.randn(tokens, d_in, device=DEV, dtype=BF16)
    params = [torch.randn(d_hidden, d_in, device=DEV, dtype=BF16) * d_in ** -0.5,
              torch.zeros(d_hidden, device=DEV, dtype=BF16),
              torch.randn(d_hidden, d_hidden, device=DEV, dtype=BF16) * d_hidden ** -0.5,
              torch.zeros(d_hidden, device=DEV, dtype=BF16)]
    grad = torch.randn(tokens, d_hidden, device=DEV, dtype=BF16)
    compiled = torch.compile(reference_mlp)

    def run(impl):
        def step():
            leaves = [t.detach().requires_grad_() for t in (x, *params)]
            impl(*leaves).backward(grad)
        return step

    outs = []
    for impl in (reference_mlp, fused_mlp):
        leaves = [t.detach().requires_grad_() for t in (x[:512], *params)]
        impl(*leaves).backward(grad[:512])
        outs.append(leaves[1].grad.float())
    err = (outs[0] - outs[1]).abs().max().item()
    return [("eager", run(reference_mlp)), ("torch.compile", run(compiled)), ("triton fused", run(fused_mlp))], err


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer repetitions")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a GPU"
    scale = 4 if args.quick else 1
    reps = 5 if args.quick else 20
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  bf16, forward + backward")
    suites = [("cross-entropy", cross_entropy_cases(16384 // scale, 32000)),
              ("linear+cross-entropy", linear_ce_cases(16384 // scale, 4096, 32000)),
              ("connector", connector_cases(8 * 576 // scale, 1024, 4096))]
    print(f"{'op':<22} {'impl':<16} {'ms':>8} {'x eager':>8} {'peak MiB':>9} {'x eager mem':>11} {'max|grad err|':>13}")
    for name, (cases, err) in suites:
        results = [(impl, *bench(fn, reps)) for impl, fn in cases]
        eager_ms, eager_mem = results[0][1], results[0][2]
        for impl, ms, mem in results:
            print(f"{name:<22} {impl:<16} {ms:>8.3f} {eager_ms / ms:>8.2f} {mem:>9.1f} {mem / eager_mem:>11.2f} "
                  f"{err if impl not in ('eager', 'torch.compile') else 0.0:>13.2e}")


if __name__ == "__main__":
    main()
