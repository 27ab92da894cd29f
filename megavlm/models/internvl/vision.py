"""InternViT's two departures from the CLIP ViT layer, as drop-in parts for megatron-core's
TransformerLayer spec (``internvit_layer_spec`` in models/common/layer_specs.py):

* QK-norm over the full width: InternViT RMS-normalises q (and k) across all heads together
  ([tokens, heads*head_dim]), not per head as megatron-core's ``qk_layernorm``. Under tensor
  parallelism a rank holds heads/TP of them, so the sum of squares is all-reduced.
* LayerScale: the attention and MLP outputs (bias included) are multiplied by a learned
  per-channel vector before the residual add; it rides on the row-parallel output projection,
  whose output is already whole (reduced over TP).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

# HF builds the q/k norms with RMSNorm's default eps, whatever the layer norms use.
QK_NORM_EPS = 1e-6


class _AllReduceSum(torch.autograd.Function):
    """Sum over the TP group whose gradient is summed too: every rank's output feeds that rank's
    own (different) heads, so each input's gradient collects from all ranks."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class FullWidthRMSNorm(torch.nn.Module):
    """RMSNorm over all attention heads' channels of q or k, [s, b, heads/TP, head_dim] in and
    out. The weight is split by heads like the projection it follows."""

    def __init__(self, config, hidden_size: int, eps: float = QK_NORM_EPS, real_heads: int | None = None):
        super().__init__()
        del hidden_size, eps  # megatron-core passes the per-head size and the layer-norm eps
        tp = self.tp_size = config.tensor_model_parallel_size  # 1 for a ViT kept whole on every rank
        # Dummy heads (padding for TP) hold zeros: they add nothing to the sum of squares, and the
        # mean is over the real heads' channels only
        self.full_width = (real_heads or config.num_attention_heads) * config.kv_channels
        width = config.num_attention_heads * config.kv_channels
        self.eps = QK_NORM_EPS
        self.weight = torch.nn.Parameter(torch.ones(width // tp, dtype=config.params_dtype))
        self.weight.tensor_model_parallel, self.weight.partition_dim, self.weight.partition_stride = True, 0, 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core import parallel_state

        dtype = x.dtype
        xf = x.float()
        sum_sq = xf.pow(2).sum(dim=(-2, -1), keepdim=True)
        if self.tp_size > 1:
            sum_sq = _AllReduceSum.apply(sum_sq, parallel_state.get_tensor_model_parallel_group())
        normed = xf * torch.rsqrt(sum_sq / self.full_width + self.eps)
        return self.weight.view(x.shape[-2], x.shape[-1]) * normed.to(dtype)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        split = {"weight": 0} if self.tp_size > 1 else {}  # a ViT kept whole on every rank: not split
        return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix, split,
                                                   sharded_offsets)


def layer_scaled(row_parallel_cls: type) -> type:
    """``row_parallel_cls`` (megatron-core's or TE's row-parallel linear) with LayerScale on its
    output; the spec passes ``layer_scale_init``."""

    class LayerScaled(row_parallel_cls):
        def __init__(self, *args, layer_scale_init: float, **kwargs):
            super().__init__(*args, **kwargs)
            config = kwargs["config"]
            self.layer_scale = torch.nn.Parameter(torch.full((self.output_size,), float(layer_scale_init),
                                                             dtype=config.params_dtype, device=self.weight.device))
            # replicated over TP; with sequence parallelism each rank sees part of the tokens
            self.layer_scale.sequence_parallel = config.sequence_parallel

        def forward(self, *args, **kwargs):
            out, bias = super().forward(*args, **kwargs)
            if bias is not None:
                out = out + bias
            return out * self.layer_scale, None

    LayerScaled.__name__ = LayerScaled.__qualname__ = f"LayerScaled{row_parallel_cls.__name__}"
    return LayerScaled
