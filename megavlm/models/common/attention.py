"""Core attention on torch's scaled_dot_product_attention, for megatron-core's local spec.

megatron-core's local ``DotProductAttention`` materialises the full score matrix in fp32; SDPA
picks flash / memory-efficient kernels on GPU and a fused CPU kernel here, handles grouped-query
attention natively, and gives the same numbers. Packed sequences (``PackedSeqParams`` with
``cu_seqlens``) attend within each sample only: one SDPA call per sample, the block-diagonal
reference that Transformer Engine's THD kernels are checked against.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class SDPAttention(MegatronModule):
    """Drop-in for megatron-core's core attention: q [sq, b, np, hn], k/v [sk, b, ng, hn]."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str = "self",
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not implement context parallelism; use transformer_impl: te")
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type == AttnMaskType.causal
        if attention_bias is not None:
            raise ValueError("SDPAttention does not support attention_bias")
        dropout = self.dropout_p if self.training else 0.0
        if packed_seq_params is not None:
            if packed_seq_params.qkv_format != "thd":
                raise ValueError(f"SDPAttention packs only the 'thd' format, got {packed_seq_params.qkv_format!r}")
            return self._packed(query, key, value, packed_seq_params, causal, dropout)
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask = None
        if attention_mask is not None:  # megatron convention: True = masked out
            mask = ~attention_mask
            if causal:  # like TE's "padding_causal": the given mask and causality together
                sq, sk = q.shape[-2], k.shape[-2]
                mask = mask & torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal and mask is None,
                                             scale=self.softmax_scale, enable_gqa=q.shape[1] != k.shape[1])
        sq, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)

    def _packed(self, query, key, value, params, causal, dropout):
        """THD inputs [t, n, d] (or [t, 1, n, d]); attention restricted to each cu_seqlens segment."""
        squeeze = query.dim() == 4
        if squeeze:
            query, key, value = (t.squeeze(1) for t in (query, key, value))
        bounds_q = params.cu_seqlens_q.tolist()
        bounds_k = params.cu_seqlens_kv.tolist()
        outputs = []
        for (q0, q1), (k0, k1) in zip(zip(bounds_q[:-1], bounds_q[1:]), zip(bounds_k[:-1], bounds_k[1:])):
            q = query[q0:q1].transpose(0, 1).unsqueeze(0)
            k = key[k0:k1].transpose(0, 1).unsqueeze(0)
            v = value[k0:k1].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=causal, scale=self.softmax_scale,
                                               enable_gqa=q.shape[1] != k.shape[1])
            outputs.append(o.squeeze(0).transpose(0, 1))
        total = query.shape[0]
        out = torch.cat(outputs, 0) if outputs else query.new_zeros(0, *query.shape[1:])
        if out.shape[0] < total:  # padding tokens after the last segment
            out = torch.cat([out, out.new_zeros(total - out.shape[0], *out.shape[1:])], 0)
        out = out.reshape(total, -1)
        return out.unsqueeze(1) if squeeze else out
