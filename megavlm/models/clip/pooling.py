"""One vector per image and per text, as the contrastive config asks: CLIP reads the class token
and the end-of-text token; SigLIP pools the image with attention (a learned probe attends to
every patch, then a residual MLP: HF's multihead attention pooling head) and reads the last
position of the padded text row. The model composes whichever ``image_pooler`` /
``text_pooler`` build, so its forward never branches on the choice."""
from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megavlm.config.model import ModelConfig, VisionConfig
from megavlm.models.common.parallel_attention import ParallelAttention
from megavlm.models.common.transformer_config import vision_activation


class ClassTokenPool(torch.nn.Module):
    """features [n, tokens, h] (class token first, final norm applied) -> [n, h]."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features[:, 0]


class AttentionPool(MegatronModule):
    """SigLIP's pooling head on tensor-parallel linears: heads of the probe's attention and the
    MLP's columns are split over TP; the probe and the norm are replicated."""

    def __init__(self, vision: VisionConfig, config: TransformerConfig, tp_group=None):
        super().__init__(config=config)
        hidden = vision.hidden_size
        self.probe = torch.nn.Parameter(torch.randn(hidden) * config.init_method_std)
        self.attention = ParallelAttention(config, hidden, hidden, vision.built_heads, hidden // vision.num_heads,
                                           bias=True, tp_group=tp_group)
        self.norm = torch.nn.LayerNorm(hidden, eps=vision.norm_eps)
        self.linear_fc1 = ColumnParallelLinear(hidden, vision.ffn_hidden_size, config=config,
                                               init_method=config.init_method, bias=True, gather_output=False,
                                               tp_group=tp_group)
        self.linear_fc2 = RowParallelLinear(vision.ffn_hidden_size, hidden, config=config,
                                            init_method=config.output_layer_init_method, bias=True,
                                            input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)
        self.activation = vision_activation(vision.activation)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [n, tokens, h] -> [n, h]."""
        context = features.transpose(0, 1)                                   # [tokens, n, h]
        probe = self.probe.to(context.dtype).expand(1, context.shape[1], -1)  # [1, n, h]
        pooled = self.attention(probe, context)
        hidden = self.activation(self.linear_fc1(self.norm(pooled))[0])
        return (pooled + self.linear_fc2(hidden)[0])[0]


class EndOfTextPool(torch.nn.Module):
    """The last real token of each row (the end-of-text token texts end with): [b, s, h] -> [b, h]."""

    def forward(self, hidden: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        last = text_mask.long().sum(1).clamp(min=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class LastPositionPool(torch.nn.Module):
    """The last position of the padded row, whatever token it holds (SigLIP)."""

    def forward(self, hidden: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        return hidden[:, -1]


class MeanPool(torch.nn.Module):
    """The mean over each row's real tokens."""

    def forward(self, hidden: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        mask = text_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def image_pooler(model: ModelConfig, config: TransformerConfig, pg_collection=None) -> torch.nn.Module:
    if model.contrastive.image_pooling == "class_token":
        return ClassTokenPool()
    if model.vision.tensor_parallel == 1 and pg_collection is not None:
        from megavlm.models.common.replicated import build_whole

        return build_whole(AttentionPool, pg_collection, model.vision, config, pg_collection.solo)
    return AttentionPool(model.vision, config, pg_collection.tp if pg_collection is not None else None)


def text_pooler(model: ModelConfig) -> torch.nn.Module:
    return {"eot": EndOfTextPool, "last": LastPositionPool, "mean": MeanPool}[model.contrastive.text_pooling]()
