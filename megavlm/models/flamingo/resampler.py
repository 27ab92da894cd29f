"""Perceiver resampler on tensor-parallel megatron-core linears.

``num_latents`` learned latents attend, over ``depth`` layers, to [image features; latents] (the
latents are concatenated to the keys and values, as in Flamingo), each layer followed by a
ReLU feed-forward network; a final LayerNorm. Works at the ViT's width. A media item may hold
several frames: each frame's features get a learned frame embedding and the latents attend to
all frames at once. Heads and FFN columns are split over TP; norms and latents are replicated.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megavlm.config.model import FlamingoConfig
from megavlm.models.common.module_list import ShardedModuleList
from megavlm.models.common.parallel_attention import ParallelAttention


class ResamplerLayer(MegatronModule):
    def __init__(self, f: FlamingoConfig, config: TransformerConfig, width: int, tp_group=None):
        super().__init__(config=config)
        self.context_norm = torch.nn.LayerNorm(width)
        self.latents_norm = torch.nn.LayerNorm(width)
        self.attention = ParallelAttention(config, width, width, f.resampler_built_heads, f.resampler_head_dim,
                                           bias=False, tp_group=tp_group)
        self.mlp_norm = torch.nn.LayerNorm(width)
        ffn = f.resampler_ffn_mult * width
        self.linear_fc1 = ColumnParallelLinear(width, ffn, config=config, init_method=config.init_method, bias=False,
                                               gather_output=False, tp_group=tp_group)
        self.linear_fc2 = RowParallelLinear(ffn, width, config=config, init_method=config.output_layer_init_method,
                                            bias=False, input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)

    def forward(self, context: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """context [t, n, w], latents [L, n, w] -> latents [L, n, w]."""
        normed = self.latents_norm(latents)
        keys = torch.cat([self.context_norm(context), normed])
        latents = latents + self.attention(normed, keys)
        hidden = F.relu(self.linear_fc1(self.mlp_norm(latents))[0])
        return latents + self.linear_fc2(hidden)[0]


class PerceiverResampler(MegatronModule):
    def __init__(self, f: FlamingoConfig, config: TransformerConfig, width: int, tp_group=None):
        super().__init__(config=config)
        self.latents = torch.nn.Parameter(torch.randn(f.num_latents, width))
        # Frames of one media item are told apart by a learned embedding (none for still images).
        self.frame_embeddings = torch.nn.Parameter(
            torch.randn(f.max_frames, width) * config.init_method_std) if f.max_frames > 1 else None
        self.layers = ShardedModuleList(ResamplerLayer(f, config, width, tp_group) for _ in range(f.resampler_depth))
        self.final_norm = torch.nn.LayerNorm(width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [n, tokens, w] (one frame per item) or [n, frames, tokens, w] -> [n, latents, w]."""
        if features.dim() == 4:
            frames = features.shape[1]
            if self.frame_embeddings is None or frames > self.frame_embeddings.shape[0]:
                limit = 1 if self.frame_embeddings is None else self.frame_embeddings.shape[0]
                raise ValueError(f"a media item has {frames} frames; flamingo.max_frames is {limit}")
            features = (features + self.frame_embeddings[:frames, None, :]).flatten(1, 2)
        context = features.transpose(0, 1)                          # [t, n, w]
        latents = self.latents.unsqueeze(1).expand(-1, features.shape[0], -1)
        for layer in self.layers:
            latents = layer(context, latents)
        return self.final_norm(latents).transpose(0, 1)
