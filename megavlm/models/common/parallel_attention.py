"""Tensor-parallel multi-head attention whose keys/values may come from another sequence of
another width: the Q-Former's cross-attention to ViT features, Flamingo's gated cross-attention
and Perceiver resampler. megatron-core's CrossAttention assumes both sides share the hidden size.

Queries and the fused key/value projection are column-parallel (heads split over TP; the
key/value rows interleave per head, [k_h, v_h], so a contiguous TP split keeps heads whole),
the output projection is row-parallel. Scores go through torch SDPA.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class ParallelAttention(MegatronModule):
    def __init__(self, config: TransformerConfig, q_dim: int, kv_dim: int, num_heads: int, head_dim: int,
                 bias: bool = True, out_dim: int | None = None, tp_group=None):
        super().__init__(config=config)
        tp = tp_group.size() if tp_group is not None else config.tensor_model_parallel_size
        if num_heads % tp:
            raise ValueError(f"{num_heads} attention heads do not split over tensor_parallel={tp}")
        self.heads_local, self.head_dim = num_heads // tp, head_dim
        inner = num_heads * head_dim
        self.linear_q = ColumnParallelLinear(q_dim, inner, config=config, init_method=config.init_method, bias=bias,
                                             gather_output=False, tp_group=tp_group)
        self.linear_kv = ColumnParallelLinear(kv_dim, 2 * inner, config=config, init_method=config.init_method,
                                              bias=bias, gather_output=False, tp_group=tp_group)
        self.linear_proj = RowParallelLinear(inner, out_dim or q_dim, config=config,
                                             init_method=config.output_layer_init_method, bias=bias,
                                             input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)
        self.scale = 1.0 / math.sqrt(head_dim)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [s, b, q_dim]; context [sk, b, kv_dim] (default: hidden); mask broadcastable to
        [b, heads, s, sk], True where attention is NOT allowed. Returns [s, b, out_dim]."""
        context = hidden if context is None else context
        s, b = hidden.shape[:2]
        sk = context.shape[0]
        q = self.linear_q(hidden)[0].view(s, b, self.heads_local, self.head_dim).permute(1, 2, 0, 3)
        kv = self.linear_kv(context)[0].view(sk, b, self.heads_local, 2, self.head_dim)
        k, v = (t.permute(1, 2, 0, 3) for t in kv.unbind(3))
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            # A row with nothing to attend to is defined as 0 (and gets no gradient); SDPA would
            # give NaN, so it attends everywhere first and is zeroed after.
            empty = mask.all(-1, keepdim=True)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~(mask & ~empty), scale=self.scale)
            out = out.masked_fill(empty, 0.0)
        out = out.permute(2, 0, 1, 3).reshape(s, b, self.heads_local * self.head_dim)
        return self.linear_proj(out)[0]
