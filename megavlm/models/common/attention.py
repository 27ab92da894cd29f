"""Core attention on torch's scaled_dot_product_attention, for megatron-core's local spec.

megatron-core's local ``DotProductAttention`` materialises the full score matrix in fp32; SDPA
picks flash / memory-efficient kernels on GPU and a fused CPU kernel here, handles grouped-query
attention natively, and gives the same numbers.

Packed rows (``PackedSeqParams`` with ``cu_seqlens``) attend within each sample only, in ONE
attention call (``varlen_attention``): torch's flash varlen kernel on GPUs (fp16/bf16), and on
CPUs — where neither that kernel nor FlexAttention's backward exists — one SDPA call over the
samples gathered into a padded [samples, heads, longest, dim] batch with a key-length mask, so the
cost is per sample (sum of l^2), not per row (t^2). ``reference_varlen_attention`` (one SDPA
call per sample) is what both are tested against.

Prefix-LM layers (``AttnMaskType.arbitrary``) take the mask their batch brings: a dense mask for
padded rows, or, for packed rows, each segment's prefix length (models/common/prefix_lm.py):
within a segment key j is visible to query i when j <= i or j < its prefix (the padded-batch path;
flash varlen has no such mask).
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
        prefix = getattr(params, "prefix_lengths", None)
        if self.attn_mask_type == AttnMaskType.arbitrary and prefix is None:
            raise ValueError("a prefix-LM layer got packed rows without prefix lengths (PrefixPackedSeqParams)")
        out = varlen_attention(query, key, value, params.cu_seqlens_q, params.cu_seqlens_kv,
                               causal or prefix is not None, self.softmax_scale, dropout,
                               getattr(params, "max_seqlen_q", None), getattr(params, "max_seqlen_kv", None), prefix)
        out = out.reshape(out.shape[0], -1)
        return out.unsqueeze(1) if squeeze else out


def _flash_varlen():
    """torch's flash varlen attention, where this torch has it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_attention(q, k, v, cu_q, cu_k, causal: bool, scale: float, dropout: float = 0.0, max_q=None, max_k=None,
                     prefix_lengths=None):
    """q [t, hq, d], k/v [t, hk, d] (hq a multiple of hk); segment i is rows cu[i]:cu[i+1].
    Each segment attends to itself only (causally: key j <= query i, counted from the segment's
    start; with ``prefix_lengths``, also every key j < prefix_lengths[i]). Rows after the last
    segment get zeros. One kernel call."""
    flash = (_flash_varlen() if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and not dropout
             and prefix_lengths is None else None)
    if flash is not None:
        lengths_q, lengths_k = cu_q.diff(), cu_k.diff()
        out = flash(q, k, v, cu_q.int(), cu_k.int(), int(max_q or lengths_q.max()), int(max_k or lengths_k.max()),
                    scale=scale, window_size=(-1, 0) if causal else (-1, -1), enable_gqa=q.shape[1] != k.shape[1])
        return _zero_tail(out, int(cu_q[-1]))
    return _padded_batch_attention(q, k, v, cu_q, cu_k, causal, scale, dropout, prefix_lengths)


def _zero_tail(out: torch.Tensor, covered: int) -> torch.Tensor:
    if covered < out.shape[0]:
        out = torch.cat([out[:covered], out.new_zeros(out.shape[0] - covered, *out.shape[1:])])
    return out


def _segments(cu: torch.Tensor):
    """Start rows [n, longest] (clamped inside the row for padding), and which are real."""
    starts, lengths = cu[:-1].long(), cu.diff().long()
    offsets = torch.arange(int(lengths.max()), device=cu.device)
    real = offsets < lengths.unsqueeze(1)
    rows = torch.where(real, starts.unsqueeze(1) + offsets, starts.unsqueeze(1))
    return rows, real


def _padded_batch_attention(q, k, v, cu_q, cu_k, causal: bool, scale: float, dropout: float, prefix_lengths=None):
    keep = (cu_q.diff() > 0) & (cu_k.diff() > 0)   # empty segments would give all-masked rows (NaN)
    if not bool(keep.all()):
        cu_q = torch.cat([cu_q[:1], cu_q[1:][keep]])
        cu_k = torch.cat([cu_k[:1], cu_k[1:][keep]])
        prefix_lengths = prefix_lengths[keep] if prefix_lengths is not None else None
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    if cu_q.numel() < 2:
        return out
    rows_q, real_q = _segments(cu_q)
    rows_k, real_k = _segments(cu_k)
    qb, kb, vb = (t[rows].permute(0, 2, 1, 3) for t, rows in ((q, rows_q), (k, rows_k), (v, rows_k)))
    if causal and prefix_lengths is None and torch.equal(cu_q, cu_k):
        # Padding sits after each sample's tokens, so causality alone hides it from every real
        # query (the padded queries' outputs are dropped): no mask, SDPA's fastest kernels.
        mask = None
    else:
        mask = real_k[:, None, None, :]                               # [n, 1, 1, Lk]: True = attend
        if causal:
            visible = torch.ones(rows_q.shape[1], rows_k.shape[1], dtype=torch.bool, device=q.device).tril()
            if prefix_lengths is not None:   # [n, 1, Lq, Lk]: causal, or the key inside the segment's prefix
                keys = torch.arange(rows_k.shape[1], device=q.device)
                visible = visible | (keys < prefix_lengths.to(q.device).reshape(-1, 1, 1, 1))
            mask = mask & visible
    attended = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, dropout_p=dropout, scale=scale,
                                              is_causal=causal and mask is None, enable_gqa=qb.shape[1] != kb.shape[1])
    return out.index_put((rows_q[real_q],), attended.permute(0, 2, 1, 3)[real_q])


def reference_varlen_attention(q, k, v, cu_q, cu_k, causal: bool, scale: float):
    """One SDPA call per segment: the plain reference for ``varlen_attention``."""
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    parts = []
    for q0, q1, k0, k1 in zip(bounds_q[:-1], bounds_q[1:], bounds_k[:-1], bounds_k[1:]):
        if q1 == q0:
            continue
        qs, ks, vs = (t[a:b].transpose(0, 1).unsqueeze(0) for t, a, b in ((q, q0, q1), (k, k0, k1), (v, k0, k1)))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale, enable_gqa=qs.shape[1] != ks.shape[1])
        parts.append(o.squeeze(0).transpose(0, 1))
    parts.append(q.new_zeros(q.shape[0] - bounds_q[-1], q.shape[1], v.shape[-1]))
    return torch.cat(parts)
