"""Prefix-LM attention (PaliGemma): each sample's prefix — the image and the prompt, everything
before its first supervised token — attends bidirectionally, the rest causally, so the answer
still never sees a later answer token. Key j is visible to query i when ``j <= i or j < prefix``.

Padded rows carry one prefix length per row and get a dense [b, 1, s, s] mask; packed rows carry
one per ``cu_seqlens`` segment (``PrefixPackedSeqParams``), and attention builds each segment's
mask itself (models/common/attention.py), so packing keeps every sample's prefix block.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megavlm.losses.lm_loss import IGNORE_INDEX


@dataclass
class PrefixPackedSeqParams(PackedSeqParams):
    """Packed rows whose segments each start with a bidirectional prefix of ``prefix_lengths[i]`` tokens."""

    prefix_lengths: torch.Tensor = None


def prefix_length(labels: list[int]) -> int:
    """Tokens before the first supervised one: labels are shifted (labels[t] is the target after
    token t), so the first supervised token sits one after the first label. A sample without any
    label is all prefix."""
    first = next((t for t, label in enumerate(labels) if label != IGNORE_INDEX), None)
    return len(labels) if first is None else first + 1


def prefix_lm_mask(prefix_lengths: torch.Tensor, seq_length: int) -> torch.Tensor:
    """[b, 1, s, s] bool, True where attention is NOT allowed (megatron-core's convention)."""
    positions = torch.arange(seq_length, device=prefix_lengths.device)
    visible = (positions[None, :] <= positions[:, None])[None] | \
        (positions[None, None, :] < prefix_lengths.reshape(-1, 1, 1))
    return ~visible.unsqueeze(1)


def prefix_lm_attention(prefix_lengths: torch.Tensor, seq_length: int, packed_seq_params=None):
    """(attention_mask, packed_seq_params) for a batch: a dense mask for padded rows, or the packed
    parameters with each segment's prefix length for packed rows."""
    if packed_seq_params is None:
        return prefix_lm_mask(prefix_lengths, seq_length), None
    segments = packed_seq_params.cu_seqlens_q.numel() - 1
    if prefix_lengths.numel() != segments:
        raise ValueError(f"packed row: {prefix_lengths.numel()} prefix lengths for {segments} cu_seqlens segments")
    fields = {name: getattr(packed_seq_params, name) for name in PackedSeqParams.__dataclass_fields__}
    prefix_lengths = prefix_lengths.to(packed_seq_params.cu_seqlens_q.device)
    return None, PrefixPackedSeqParams(**fields, prefix_lengths=prefix_lengths)
