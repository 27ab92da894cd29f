"""ViT encoder (CLIP ViT-L/14-336 shape) assembled from megatron-core's TransformerBlock."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from megavlm.config.model import VisionConfig


class VisionTransformer(MegatronModule):
    """Patch embedding, optional class token, learned positions, pre-LN, bidirectional layers.

    Only the layers up to ``vision.feature_layer`` are built (LLaVA reads the second-to-last
    hidden state, so the last layer and the final norm would never run); the output is that
    hidden state, [images, tokens, hidden], with the class token dropped unless kept.

    Under sequence parallelism the token axis is split over the TP ranks from ``ln_pre`` on. A
    ViT's token count (577 for CLIP-L/336) rarely divides TP, so it is padded with zero tokens
    that no query attends to (a key mask) and that are dropped after the last layer.
    """

    def __init__(self, vision: VisionConfig, config: TransformerConfig, block_spec, norm_impl,
                 pg_collection=None):
        super().__init__(config=config)
        self.vision = vision
        self.tp_group = pg_collection.tp if pg_collection is not None else None
        hidden = vision.hidden_size
        self.patch_embed = torch.nn.Conv2d(3, hidden, kernel_size=vision.patch_size, stride=vision.patch_size,
                                           bias=vision.patch_bias)
        num_positions = vision.num_patches + (1 if vision.class_token else 0)
        std = config.init_method_std
        self.class_token = torch.nn.Parameter(torch.randn(hidden) * std) if vision.class_token else None
        self.position_embeddings = torch.nn.Parameter(torch.randn(num_positions, hidden) * std)
        self.ln_pre = (build_module(norm_impl, config=config, hidden_size=hidden, eps=vision.norm_eps)
                       if vision.pre_norm else None)
        # post_norm: a final LayerNorm on the features (BLIP-2); LLaVA reads an inner layer without one
        self.encoder = TransformerBlock(config=config, spec=block_spec, post_layer_norm=vision.post_norm,
                                        pre_process=True, post_process=vision.post_norm, pg_collection=pg_collection)
        for name, param in self.named_parameters():
            param.megavlm_vit_depth = self._depth(name)

    def _depth(self, name: str) -> int:
        """0 for the embeddings, i + 1 for layer i, layers + 1 for the final norm (layer-wise LR decay)."""
        if name.startswith("encoder.layers."):
            return int(name.split(".")[2]) + 1
        return self.vision.layers_to_build + 1 if name.startswith("encoder.") else 0

    def set_input_tensor(self, input_tensor):  # the ViT never receives pipeline input
        pass

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch + class-token + position embeddings, [s, n, h] (before ln_pre)."""
        weight = self.patch_embed.weight
        x = self.patch_embed(pixel_values.to(weight.dtype)).flatten(2).transpose(1, 2)  # [n, patches, h]
        if self.class_token is not None:
            x = torch.cat([self.class_token.expand(x.shape[0], 1, -1), x], dim=1)
        return (x + self.position_embeddings).transpose(0, 1).contiguous()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [n, 3, H, W] -> features [n, tokens_per_image, hidden]."""
        expected = (3, self.vision.image_size, self.vision.image_size)
        if tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"images have shape {tuple(pixel_values.shape[1:])}, the vision encoder expects {expected}")
        x = self.embed(pixel_values)
        tokens, mask = x.shape[0], None
        if self.config.sequence_parallel:
            x, mask = self._pad_for_sequence_parallel(x)
            x = scatter_to_sequence_parallel_region(x, group=self.tp_group)
        if self.ln_pre is not None:
            x = self.ln_pre(x)
        x = self.encoder(x, attention_mask=mask)
        if self.config.sequence_parallel:
            # the features leave as whole copies on every rank; their gradient arrives whole too
            x = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False, group=self.tp_group)[:tokens]
        x = x.transpose(0, 1)
        if self.class_token is not None and not self.vision.keep_class_token:
            x = x[:, 1:]
        return x

    def _pad_for_sequence_parallel(self, x: torch.Tensor):
        """Zero tokens up to a multiple of TP, and the key mask (True = masked) that hides them."""
        tp = self.config.tensor_model_parallel_size
        pad = -x.shape[0] % tp
        if not pad:
            return x, None
        mask = torch.zeros(1, 1, 1, x.shape[0] + pad, dtype=torch.bool, device=x.device)
        mask[..., x.shape[0]:] = True
        return F.pad(x, (0, 0, 0, 0, 0, pad)), mask


def build_vision_tower(model, parallel, pg_collection=None, dtype: torch.dtype = torch.float32,
                       recompute: bool = False) -> VisionTransformer:
    """The ViT of any family, tagged ``vision``, with the layer spec its config asks for (CLIP's,
    or InternViT's QK-norm and LayerScale)."""
    from megavlm.models.common.layer_specs import block_spec, norm_spec, vision_layer_spec
    from megavlm.models.common.tags import tag_component
    from megavlm.models.common.transformer_config import vision_transformer_config

    if model.vision.tensor_parallel == 1 and pg_collection is not None:
        from megavlm.models.common.replicated import build_replicated

        return tag_component(build_replicated(VisionTransformer, model, parallel, pg_collection, dtype, recompute,
                                              vision_layer_spec(model), norm_spec(model.transformer_impl)), "vision")
    config = vision_transformer_config(model, parallel, dtype, recompute)
    impl = model.transformer_impl
    spec = block_spec(vision_layer_spec(model), impl, config)
    return tag_component(VisionTransformer(model.vision, config, spec, norm_spec(impl), pg_collection), "vision")
