"""megatron-core's tensor-parallel linears with a frozen-weight path that stays a 2-D matmul.

For a frozen weight megatron-core computes the input gradient as ``grad_output.matmul(weight)``.
When ``grad_output`` is a transposed view — the output layer's gradient always is, since GPTModel
returns ``logits.transpose(0, 1).contiguous()`` — torch cannot fold it into one matrix and runs a
batched matmul over an expanded weight: on CPU that one op cost more than the rest of a LLaVA
stage-1 step. Here the gradient is viewed as [tokens, out] in whichever of its two leading orders
is contiguous (a copy only when neither is), so dgrad is always one GEMM. A trainable weight goes
through megatron-core's own function, which copies the gradient to a contiguous one for its
weight-gradient GEMM anyway: making it contiguous before that function sees it lets the input
gradient use the same copy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region


def matmul_2d(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., k] @ weight [k, n] as a single GEMM, for a contiguous x or a [s, b, k] x whose
    storage is [b, s, k] (the result then has the same transposed layout)."""
    if x.dim() == 3 and not x.is_contiguous() and x.transpose(0, 1).is_contiguous():
        b_major = x.transpose(0, 1)
        out = b_major.reshape(-1, x.shape[-1]) @ weight
        return out.view(*b_major.shape[:-1], weight.shape[-1]).transpose(0, 1)
    return (x.reshape(-1, x.shape[-1]) @ weight).view(*x.shape[:-1], weight.shape[-1])


class _FrozenWeightLinear(torch.autograd.Function):
    """y = x W^T + b with W frozen: saves only W, no weight gradient, dgrad as one GEMM."""

    @staticmethod
    def forward(ctx, input_, weight, bias, allreduce_dgrad, tp_group):
        ctx.save_for_backward(weight)
        ctx.allreduce_dgrad, ctx.tp_group = allreduce_dgrad, tp_group
        return F.linear(input_, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        (weight,) = ctx.saved_tensors
        grad_input = matmul_2d(grad_output, weight)
        if ctx.allreduce_dgrad:
            grad_input = grad_input.contiguous()
            torch.distributed.all_reduce(grad_input, group=ctx.tp_group)
        return grad_input, None, None, None, None


def frozen_weight_linear(input_, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
                         tp_group, grad_output_buffer=None, wgrad_deferral_limit=None):
    """Same arguments and semantics as megatron-core's ``linear_with_frozen_weight``."""
    if sequence_parallel:
        input_ = gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=True, group=tp_group)
    return _FrozenWeightLinear.apply(input_, weight, bias, allreduce_dgrad, tp_group)


class _ContiguousGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class ColumnLinear(ColumnParallelLinear):
    """ColumnParallelLinear whose input gradient is one GEMM, frozen weight or not."""

    def forward(self, input_, weight=None, runtime_gather_output=None):
        output, bias = super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)
        used = weight if weight is not None else self.weight
        if used is not None and used.requires_grad and torch.is_grad_enabled():
            output = _ContiguousGrad.apply(output)
        return output, bias

    def _forward_impl(self, input, weight, *args, **kwargs):
        if not weight.requires_grad:
            return frozen_weight_linear(input, weight, *args, **kwargs)
        return super()._forward_impl(input, weight, *args, **kwargs)


class RowLinear(RowParallelLinear):
    """RowParallelLinear whose frozen-weight backward is one GEMM."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        if not weight.requires_grad:
            return frozen_weight_linear(input, weight, *args, **kwargs)
        return super()._forward_impl(input, weight, *args, **kwargs)
