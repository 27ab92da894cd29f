"""Concatenating a tensor over data-parallel ranks for contrastive losses (BLIP-2's ITC, CLIP,
SigLIP): the negatives of every sample are the whole global batch."""
from __future__ import annotations

import torch
import torch.distributed as dist


def world(group) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward gives each rank the sum, over all ranks' losses, of
    the gradient of its own slice."""

    @staticmethod
    def forward(ctx, tensor, group):
        rank, size = world(group)
        ctx.group, ctx.rank, ctx.rows = group, rank, tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(size)]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None


def gather_with_grad(tensor: torch.Tensor, group) -> torch.Tensor:
    """Concatenate over ranks along dim 0, differentiably."""
    _, size = world(group)
    return tensor if size == 1 else _GatherWithGrad.apply(tensor, group)


@torch.no_grad()
def gather_no_grad(tensor: torch.Tensor, group) -> torch.Tensor:
    _, size = world(group)
    if size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


class _GatherRowsWithGrad(torch.autograd.Function):
    """_GatherWithGrad for ranks holding different numbers of rows (a skipped sample shortens a
    micro-batch): rows are padded to the longest share for the all_gather and cut back after."""

    @staticmethod
    def forward(ctx, tensor, group, sizes):
        rank, size = world(group)
        longest = max(sizes)
        padded = torch.zeros(longest, *tensor.shape[1:], dtype=tensor.dtype, device=tensor.device)
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(size)]
        dist.all_gather(parts, padded, group=group)
        ctx.group, ctx.start, ctx.rows = group, sum(sizes[:rank]), tensor.shape[0]
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.start:ctx.start + ctx.rows], None, None


def gather_rows_with_grad(tensor: torch.Tensor, group) -> tuple[torch.Tensor, int]:
    """(every rank's rows concatenated along dim 0, the offset of this rank's first row), for any
    number of rows per rank; the backward sums every rank's loss gradient into each rank's rows."""
    rank, size = world(group)
    if size == 1:
        return tensor, 0
    counts = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(size)]
    dist.all_gather(counts, torch.tensor([tensor.shape[0]], device=tensor.device), group=group)
    sizes = [int(c) for c in counts]
    return _GatherRowsWithGrad.apply(tensor, group, sizes), sum(sizes[:rank])
