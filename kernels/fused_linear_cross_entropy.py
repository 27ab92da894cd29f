"""Fused output layer + cross-entropy, chunked over tokens: the [tokens x vocab] logits never exist.

For each chunk of tokens the local vocab-shard logits are computed (a GEMM), turned into
per-row statistics by the Triton kernels of ``cross_entropy`` (all-reduced over TP), and
immediately into d(loss)/d(logits) in place, which two more GEMMs turn into the chunk's input
gradient and an accumulated weight gradient. Peak extra memory is one chunk of logits. Because
the loss is a sum, its gradients are known in the forward; backward only scales them by the
incoming scalar gradient (the approach of Liger-Kernel's fused linear cross-entropy).

Under TP, the hidden states are replicated and the weight is vocab-sharded (a column-parallel
output layer): the input gradient is a sum over the shards and is all-reduced once.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ._utils import check_device
from .cross_entropy import IGNORE_INDEX, _tp, backward_into, forward_stats, global_lse_and_target


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_size, group, chunk_size):
        check_device(hidden, weight)
        rank, size = _tp(group)
        local = weight.shape[0]
        vocab_start = rank * local
        n_valid = max(0, min(local, vocab_size - vocab_start))
        h = hidden.reshape(-1, hidden.shape[-1])
        t = targets.reshape(-1)
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        grad_h = torch.zeros_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk_size):
            hc, tc = h[start:start + chunk_size], t[start:start + chunk_size].contiguous()
            logits = hc @ weight.t()                                   # [chunk, V/TP]
            row_max, row_sumexp, row_target = forward_stats(logits, tc, n_valid, vocab_start)
            lse, target_logit = global_lse_and_target(row_max, row_sumexp, row_target, group)
            keep = tc != IGNORE_INDEX
            total += torch.where(keep, lse - target_logit, torch.zeros_like(lse)).sum()
            if need_h or need_w:
                backward_into(logits, logits, tc, lse, keep.float(), n_valid, vocab_start)  # now d(sum)/d(logits)
                if need_h:
                    grad_h[start:start + chunk_size] = logits @ weight
                if need_w:
                    grad_w.addmm_(logits.t().float(), hc.float())
        if need_h and size > 1:
            dist.all_reduce(grad_h, group=group)
        ctx.save_for_backward(grad_h if need_h else None, grad_w if need_w else None)
        ctx.meta = (hidden.shape, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors
        shape, w_dtype = ctx.meta
        dh = (grad_h * grad_total.to(grad_h.dtype)).view(shape) if grad_h is not None else None
        dw = (grad_w * grad_total).to(w_dtype) if grad_w is not None else None
        return dh, dw, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               vocab_size: int | None = None, group=None, chunk_size: int = 4096) -> torch.Tensor:
    """Sum over tokens (targets != -100) of cross-entropy(hidden @ weight.T). hidden [..., H]
    (replicated over TP), weight [V/TP, H] (vocab-sharded), targets [...]."""
    _, size = _tp(group)
    vocab_size = vocab_size if vocab_size is not None else weight.shape[0] * size
    return _FusedLinearCrossEntropy.apply(hidden, weight, targets, vocab_size, group, chunk_size)


def reference_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   vocab_size: int | None = None) -> torch.Tensor:
    """Plain PyTorch: materialise the logits, fp32 cross-entropy, sum over kept tokens."""
    vocab_size = vocab_size or weight.shape[0]
    logits = (hidden.reshape(-1, hidden.shape[-1]) @ weight[:vocab_size].t()).float()
    return torch.nn.functional.cross_entropy(logits, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
