"""Gated cross-attention dense blocks inside the frozen LLM's layers, and the media mask.

``FusionLayer`` is megatron-core's TransformerLayer with an optional ``gated_xattn`` block run
before it (IDEFICS' placement: before layer i when i % interval == 0). The layer's own
parameters keep their names, so an unmodified LLM checkpoint loads into it; the block's tensors
are stacked in dist checkpoints along their own axis (one entry per block), not the layers'.

Block (Flamingo, IDEFICS):  h = h + tanh(a_attn) * xattn(norm(h), latents)   (0 for tokens that see no image)
                            h = h + tanh(a_dense) * mlp(norm(h))
With both gates at 0 the block is the identity, exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer

from megavlm.config.model import FlamingoConfig
from megavlm.models.common.parallel_attention import ParallelAttention


class GatedCrossAttention(MegatronModule):
    def __init__(self, config: TransformerConfig, f: FlamingoConfig, media_dim: int, tp_group=None):
        super().__init__(config=config)
        h, heads = config.hidden_size, config.num_attention_heads
        self.input_layernorm = WrappedTorchNorm(config, h, eps=config.layernorm_epsilon)
        self.attention = ParallelAttention(config, h, media_dim, heads, h // heads, bias=False, tp_group=tp_group)
        self.pre_mlp_layernorm = WrappedTorchNorm(config, h, eps=config.layernorm_epsilon)
        self.mlp = MLP(config, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
                       tp_group=tp_group)
        shape = (h,) if f.gate_type == "vector" else (1,)
        self.alpha_attn = torch.nn.Parameter(torch.full(shape, f.gate_init))
        self.alpha_dense = torch.nn.Parameter(torch.full(shape, f.gate_init))

    def forward(self, hidden: torch.Tensor, media: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hidden [s, b, h]; media [m, b, media_dim]; mask [b, 1, s, m], True where a token may NOT attend."""
        attended = self.attention(self.input_layernorm(hidden), media, mask)
        sees_media = ~mask.all(-1)                                        # [b, 1, s]
        attended = attended * sees_media.permute(2, 0, 1).to(attended.dtype)
        hidden = hidden + torch.tanh(self.alpha_attn) * attended
        out, bias = self.mlp(self.pre_mlp_layernorm(hidden))
        if bias is not None:
            out = out + bias
        return hidden + torch.tanh(self.alpha_dense) * out


@dataclass(frozen=True)
class Fusion:
    """What a FusionLayer needs to build its block (passed through the layer spec)."""

    flamingo: FlamingoConfig
    media_dim: int
    num_layers: int          # of the whole LLM (all pipeline stages)

    @property
    def num_blocks(self) -> int:
        return self.num_layers // self.flamingo.cross_attention_interval

    def block_index(self, layer_number: int) -> int | None:
        """The block before global layer ``layer_number`` (1-based), or None."""
        index = layer_number - 1
        interval = self.flamingo.cross_attention_interval
        return index // interval if index % interval == 0 else None


class FusionLayer(TransformerLayer):
    def __init__(self, *args, fusion: Fusion, **kwargs):
        super().__init__(*args, **kwargs)
        self.fusion = fusion
        self.block_index = fusion.block_index(self.layer_number)
        self.gated_xattn = (GatedCrossAttention(self.config, fusion.flamingo, fusion.media_dim, self.tp_group)
                            if self.block_index is not None else None)

    def forward(self, hidden_states, attention_mask=None, context=None, context_mask=None, **kwargs):
        """``context`` [m, b, media_dim] are the media latents, ``context_mask`` [b, 1, s, m] the
        media mask; both pass on to the next layer unchanged."""
        if self.gated_xattn is not None:
            hidden_states = self.gated_xattn(hidden_states, context, context_mask)
        output, _ = super().forward(hidden_states, attention_mask=attention_mask, **kwargs)
        return output, context

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.gated_xattn is None or not sharded_offsets:
            return state
        # Homogeneous layers are stacked along axis 0 over all LLM layers; the blocks exist only
        # every interval-th layer, so they get an axis of their own, one entry per block.
        block_prefix = f"{prefix}gated_xattn."
        for key in [k for k in state if k.startswith(block_prefix)]:
            del state[key]
        axis = (sharded_offsets[0][0], self.block_index, self.fusion.num_blocks)
        state.update(self.gated_xattn.sharded_state_dict(block_prefix, (axis, *sharded_offsets[1:]), metadata))
        return state


def fusion_layer_spec(layer_spec: ModuleSpec, fusion: Fusion) -> ModuleSpec:
    """The LLM's layer spec with FusionLayer as its module (submodules unchanged)."""
    return ModuleSpec(module=FusionLayer, params={**layer_spec.params, "fusion": fusion},
                      submodules=layer_spec.submodules)


def media_mask(input_ids: torch.Tensor, images_per_sample: torch.Tensor, image_token_id: int, slots: int,
               latents: int, all_previous: bool = False, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """[b, 1, s, slots * latents] bool, True where a token may NOT attend.

    Image k of a sample is its k-th <image> marker. A token sees the latents of the most recent
    marker at or before it (or, with ``all_previous``, of every one), never an image of another
    packed sample (``cu_seqlens``), and nothing before the first marker."""
    is_image = input_ids == image_token_id
    counts = is_image.sum(1)
    if torch.any(counts != images_per_sample) or torch.any(counts > slots):
        raise ValueError(f"<image> markers per sample {counts.tolist()} do not match the images given "
                         f"{images_per_sample.tolist()} (at most {slots} per sample)")
    current = is_image.long().cumsum(1) - 1                                 # [b, s]; -1: no image yet
    slot = torch.arange(slots, device=input_ids.device)
    if all_previous:
        allowed = slot.view(1, 1, -1) <= current.unsqueeze(-1)
    else:
        allowed = slot.view(1, 1, -1) == current.unsqueeze(-1)
    if cu_seqlens is not None:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        segment = torch.searchsorted(cu_seqlens[1:].to(input_ids.device), positions, right=True).expand_as(input_ids)
        # the segment of image k: that of its marker (markers are in order, so sort by slot)
        marker_segment = torch.full((input_ids.shape[0], slots), -1, dtype=torch.long, device=input_ids.device)
        rows, cols = is_image.nonzero(as_tuple=True)
        marker_segment[rows, current[rows, cols]] = segment[rows, cols]
        allowed &= segment.unsqueeze(-1) == marker_segment.unsqueeze(1)
    return ~allowed.repeat_interleave(latents, dim=-1).unsqueeze(1)
