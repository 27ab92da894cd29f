"""Masked (vocab-parallel) cross-entropy: Triton kernels, the plain-PyTorch reference, autograd.

Forward: one program per row streams the local vocab shard once, keeping an online max and
sum-exp (no [N, V] fp32 copy), and picks the target logit when this shard owns it. The three
per-row statistics are all-reduced over the TP group (max, rescaled sum, target), giving the
log-sum-exp over the full vocabulary. Backward: one program per row writes
(softmax - onehot) * grad into the logits' own storage (the logits are not needed afterwards),
zero for ignored rows and for TP-padding columns.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from ._utils import block, check_device

IGNORE_INDEX = -100


@triton.jit
def _ce_forward_stats(logits, stride, targets, row_max, row_sumexp, row_target, n_valid, vocab_start,
                      BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits + row * stride
    running_max = -float("inf")
    running_sum = 0.0
    for start in range(0, n_valid, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < n_valid, other=-float("inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        running_max = new_max
    target = tl.load(targets + row) - vocab_start
    owned = (target >= 0) & (target < n_valid)
    picked = tl.load(base + tl.where(owned, target, 0), mask=owned, other=0.0).to(tl.float32)
    tl.store(row_max + row, running_max)
    tl.store(row_sumexp + row, running_sum)
    tl.store(row_target + row, tl.where(owned, picked, 0.0))


@triton.jit
def _ce_backward(logits, stride, grads_out, targets, lse, grad_loss, n_cols, n_valid, vocab_start,
                 BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    src = logits + row * stride
    dst = grads_out + row * stride
    g = tl.load(grad_loss + row)
    row_lse = tl.load(lse + row)
    target = tl.load(targets + row) - vocab_start
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < n_valid
        x = tl.load(src + cols, mask=valid, other=-float("inf")).to(tl.float32)
        grad = tl.exp(x - row_lse) * g
        grad = tl.where(cols == target, grad - g, grad)
        grad = tl.where(valid, grad, 0.0)
        tl.store(dst + cols, grad.to(dst.dtype.element_ty), mask=cols < n_cols)


def _tp(group) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def global_lse_and_target(row_max, row_sumexp, row_target, group):
    """Combine per-shard statistics over the TP group into log-sum-exp and target logit."""
    _, size = _tp(group)
    if size > 1:
        global_max = row_max.clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        row_sumexp = row_sumexp * torch.exp(row_max - global_max)
        row_sumexp = torch.nan_to_num(row_sumexp, nan=0.0)  # shards with no valid column
        dist.all_reduce(row_sumexp, group=group)
        dist.all_reduce(row_target, group=group)
        row_max = global_max
    return row_max + torch.log(row_sumexp), row_target


def forward_stats(logits2d: torch.Tensor, targets: torch.Tensor, n_valid: int, vocab_start: int):
    n = logits2d.shape[0]
    stats = [torch.empty(n, dtype=torch.float32, device=logits2d.device) for _ in range(3)]
    if n_valid == 0:  # a rank holding only TP padding
        stats[0].fill_(float("-inf"))
        stats[1].zero_()
        stats[2].zero_()
        return stats
    _ce_forward_stats[(n,)](logits2d, logits2d.stride(0), targets, *stats, n_valid, vocab_start,
                            BLOCK=block(n_valid, hi=2048))
    return stats


def backward_into(logits2d: torch.Tensor, out: torch.Tensor, targets, lse, grad_loss, n_valid: int, vocab_start: int):
    n, n_cols = logits2d.shape
    _ce_backward[(n,)](logits2d, logits2d.stride(0), out, targets, lse, grad_loss, n_cols, n_valid, vocab_start,
                       BLOCK=block(n_cols, hi=2048))
    return out


class _TritonCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, vocab_size, group, inplace_backward):
        check_device(logits)
        rank, _ = _tp(group)
        local = logits.shape[-1]
        vocab_start = rank * local
        n_valid = max(0, min(local, vocab_size - vocab_start))
        flat = logits.reshape(-1, local)
        if flat.stride(1) != 1:
            flat = flat.contiguous()
        tflat = targets.reshape(-1).contiguous()
        row_max, row_sumexp, row_target = forward_stats(flat, tflat, n_valid, vocab_start)
        lse, target_logit = global_lse_and_target(row_max, row_sumexp, row_target, group)
        ignored = tflat == IGNORE_INDEX
        loss = torch.where(ignored, torch.zeros_like(lse), lse - target_logit)
        ctx.save_for_backward(flat, tflat, lse, ignored)
        ctx.meta = (logits.shape, n_valid, vocab_start, inplace_backward)
        return loss.view(targets.shape)

    @staticmethod
    def backward(ctx, grad_loss):
        flat, tflat, lse, ignored = ctx.saved_tensors
        shape, n_valid, vocab_start, inplace = ctx.meta
        g = torch.where(ignored, torch.zeros_like(lse), grad_loss.reshape(-1).float()).contiguous()
        out = flat if inplace else torch.empty_like(flat)
        backward_into(flat, out, tflat, lse, g, n_valid, vocab_start)
        return out.view(shape), None, None, None, None


def triton_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int | None = None, group=None,
                         inplace_backward: bool = False) -> torch.Tensor:
    """Per-token loss (fp32, shape of ``targets``; 0 where target == -100) for logits
    [..., V/TP] sharded over ``group``. ``vocab_size`` excludes TP padding columns.
    ``inplace_backward`` writes the gradient into the logits' storage (saves a logits-sized buffer)."""
    _, size = _tp(group)
    vocab_size = vocab_size if vocab_size is not None else logits.shape[-1] * size
    return _TritonCrossEntropy.apply(logits, targets, vocab_size, group, inplace_backward)


def reference_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """Plain PyTorch, single rank: fp32 log-softmax over the first ``vocab_size`` columns."""
    vocab_size = vocab_size or logits.shape[-1]
    flat = logits.reshape(-1, logits.shape[-1])[:, :vocab_size].float()
    t = targets.reshape(-1)
    loss = torch.nn.functional.cross_entropy(flat, t.clamp(min=0), reduction="none")
    return torch.where(t == IGNORE_INDEX, torch.zeros_like(loss), loss).view(targets.shape)
