"""InternVL's connector: pixel shuffle at ratio 0.5 (each output token holds a 2x2 block of ViT
tokens: 4x fewer tokens, 4x the channels), LayerNorm, then the 2-layer GELU MLP of LLaVA-1.5
(column- then row-parallel, one all-reduce). The LayerNorm is replicated over TP ranks."""
from __future__ import annotations

import math

import torch

from megavlm.config.model import ConnectorConfig
from megavlm.models.connectors.mlp_projector import FusedMLPProjector, MLPProjector

LAYER_NORM_EPS = 1e-5  # HF InternVLMultiModalProjector's nn.LayerNorm default


def token_grid(features: torch.Tensor) -> torch.Tensor:
    """[n, tokens, C] -> [n, S, S, C]; the ViT's patch tokens are a square grid."""
    n, tokens, channels = features.shape
    side = math.isqrt(tokens)
    if side * side != tokens or side % 2:
        raise ValueError(f"pixel shuffle needs an even square grid of ViT tokens, got {tokens} per image")
    return features.reshape(n, side, side, channels)


class PixelShuffleProjector(MLPProjector):
    def __init__(self, connector: ConnectorConfig, input_size: int, output_size: int, config, tp_group=None):
        super().__init__(ConnectorConfig(type="mlp2x_gelu", bias=connector.bias), 4 * input_size, output_size,
                         config, tp_group)
        self.layer_norm = torch.nn.LayerNorm(4 * input_size, eps=LAYER_NORM_EPS, dtype=config.params_dtype)

    def shuffle_norm(self, features: torch.Tensor) -> torch.Tensor:
        from megavlm.kernels.pixel_shuffle_norm import reference_pixel_shuffle

        shuffled = reference_pixel_shuffle(token_grid(features))
        return self.layer_norm(shuffled.reshape(features.shape[0], -1, shuffled.shape[-1]))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [n, S*S, C] -> [n, S*S/4, llm_hidden]."""
        return super().forward(self.shuffle_norm(features))


class FusedPixelShuffleProjector(PixelShuffleProjector, FusedMLPProjector):
    """The same parameters through the Triton kernels: shuffle + LayerNorm in one pass
    (kernels/pixel_shuffle_norm.py), then the fused MLP."""

    def shuffle_norm(self, features: torch.Tensor) -> torch.Tensor:
        from megavlm.kernels.pixel_shuffle_norm import pixel_shuffle_norm

        norm = self.layer_norm
        return pixel_shuffle_norm(token_grid(features).contiguous(), norm.weight, norm.bias, norm.eps)
