"""Masked next-token cross-entropy over vocab-parallel logits.

Reference implementation (the fused Triton kernels in ``kernels/`` are checked against it). Each TP
rank holds a vocab slice of the logits; the log-sum-exp and the target logit are all-reduced over the
TP group, so no rank ever materialises the full vocabulary. Columns past the true vocabulary (TP
padding) are excluded. The loss is returned as a *sum* with its token count: the trainer normalises
per supervised token over all micro-batches and DP ranks, not as a mean of per-micro-batch means.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE_INDEX = -100


def _all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, vocab_valid, group):
        # logits [N, V_local] (any float dtype), target [N] global ids (IGNORE_INDEX allowed).
        valid_logits = logits[:, :vocab_valid].float()
        if vocab_valid > 0:
            local_max = valid_logits.max(dim=-1).values
        else:  # a rank holding only padding columns
            local_max = torch.full(logits.shape[:1], float("-inf"), device=logits.device)
        global_max = _all_reduce(local_max.clone(), dist.ReduceOp.MAX, group)
        shifted = valid_logits - global_max.unsqueeze(-1)
        exp = shifted.exp()
        sum_exp = _all_reduce(exp.sum(dim=-1), dist.ReduceOp.SUM, group)

        local_target = target - vocab_start
        in_range = (local_target >= 0) & (local_target < vocab_valid)
        safe_target = torch.where(in_range, local_target, torch.zeros_like(local_target))
        picked = shifted.gather(-1, safe_target.unsqueeze(-1)).squeeze(-1) if vocab_valid > 0 else torch.zeros_like(global_max)
        picked = _all_reduce(torch.where(in_range, picked, torch.zeros_like(picked)), dist.ReduceOp.SUM, group)

        loss = sum_exp.log() - picked
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, safe_target, in_range)
        ctx.shape, ctx.dtype = logits.shape, logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, safe_target, in_range = ctx.saved_tensors
        grad = softmax
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows[in_range], safe_target[in_range]] -= 1.0
        grad.mul_(grad_loss.unsqueeze(-1))
        if grad.shape[1] != ctx.shape[1]:  # zero gradient for TP padding columns
            grad = torch.cat([grad, grad.new_zeros(grad.shape[0], ctx.shape[1] - grad.shape[1])], dim=1)
        return grad.to(ctx.dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_size: int,
                                 tp_group=None) -> torch.Tensor:
    """Per-token loss (fp32, shape of ``target``) for logits [..., V/TP] sharded over ``tp_group``."""
    tp_size = dist.get_world_size(tp_group) if tp_group is not None and dist.is_initialized() else 1
    local = logits.shape[-1]
    if tp_size == 1 and local == vocab_size:  # the whole vocabulary here: torch's fused kernel, same math
        flat = F.cross_entropy(logits.reshape(-1, local).float(), target.reshape(-1), ignore_index=IGNORE_INDEX,
                               reduction="none")
        return flat.view(target.shape)
    tp_rank = dist.get_rank(tp_group) if tp_group is not None and dist.is_initialized() else 0
    start = tp_rank * local
    valid = max(0, min(local, vocab_size - start))
    flat = _VocabParallelCrossEntropy.apply(logits.reshape(-1, local), target.reshape(-1), start, valid, tp_group)
    return flat.view(target.shape)


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                   tp_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token losses where labels != -100, and that token count.

    logits [b, s, V/TP]; labels [b, s] already shifted (labels[:, t] is the target after token t).
    """
    return LogitsHead(vocab_size, tp_group).loss(logits, labels)


def shift_labels(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """HF-style unshifted inputs -> megavlm labels: target of position t is token t+1."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = torch.where(loss_mask[:, 1:].bool(), input_ids[:, 1:], IGNORE_INDEX)
    return labels


class LogitsHead:
    """The last stage outputs logits [b, s, V/TP]; the loss is a masked cross-entropy over them."""

    def __init__(self, vocab_size: int, tp_group, cross_entropy=None):
        self.vocab_size, self.tp_group = vocab_size, tp_group
        self.cross_entropy = cross_entropy or vocab_parallel_cross_entropy

    def logits(self, output: torch.Tensor) -> torch.Tensor:
        return output

    def loss(self, output: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked cross-entropy. When at most a quarter of the rows carry a label (a stage-1
        sequence is mostly image tokens) those rows are gathered first, so the softmax never runs
        on the rest; above that, gathering and scattering back cost more than they save."""
        mask = labels != IGNORE_INDEX
        count = mask.sum()
        if not bool(count):  # keeps the graph (and the pipeline's backward) intact
            return output.sum() * 0.0, count
        if 4 * int(count) > mask.numel():
            losses = self.cross_entropy(output, labels, self.vocab_size, self.tp_group)
            return (losses * mask).sum(), count
        flat = mask.reshape(-1)
        picked = output.reshape(-1, output.shape[-1])[flat]
        losses = self.cross_entropy(picked, labels.reshape(-1)[flat], self.vocab_size, self.tp_group)
        return losses.sum(), count


class FusedLinearHead:
    """The last stage outputs hidden states [b, s, H]; output layer and loss run as one chunked
    op (kernels/fused_linear_cross_entropy.py), and logits are made only when asked for."""

    def __init__(self, vocab_size: int, tp_group, weight_fn, chunk_tokens: int):
        self.vocab_size, self.tp_group = vocab_size, tp_group
        self._weight_fn, self.chunk_tokens = weight_fn, chunk_tokens

    def weight_fn(self) -> torch.Tensor:
        if self._weight_fn is None:
            raise RuntimeError("the fused linear cross-entropy head runs on the last pipeline stage only")
        return self._weight_fn()

    def logits(self, output: torch.Tensor) -> torch.Tensor:
        return output @ self.weight_fn().t()

    def loss(self, output: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from megavlm.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

        total = fused_linear_cross_entropy(output, self.weight_fn(), labels, self.vocab_size, self.tp_group,
                                           self.chunk_tokens)
        return total, (labels != IGNORE_INDEX).sum()
