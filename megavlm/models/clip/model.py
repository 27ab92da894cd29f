"""CLIP / SigLIP: a ViT and a text transformer, each pooled to one vector and projected into a
shared space, trained to match image-text pairs against the rest of the global batch.

Composition only: the ViT is every family's (models/common/vision_transformer.py, split over TP
like the LLM's layers), the text tower is megatron-core layers (text_encoder.py, split over TP),
the poolings come from pooling.py and the objective (InfoNCE or pairwise sigmoid, with its
learned scale) from losses/contrastive.py. Tensor- and data-parallel; never pipelined.

Components: ``vision`` (ViT and image pooling), ``text`` (text transformer), ``connector`` (the
projections into the shared space and the objective's scale and bias).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from megavlm.config.model import ModelConfig, ParallelConfig
from megavlm.losses.contrastive import build_objective
from megavlm.models.clip.pooling import image_pooler, text_pooler
from megavlm.models.clip.text_encoder import TextTransformer
from megavlm.models.common.layer_specs import block_spec, text_encoder_layer_spec
from megavlm.models.common.tags import tag_component
from megavlm.models.common.transformer_config import language_transformer_config, vision_transformer_config
from megavlm.models.common.vision_transformer import build_vision_tower
from megavlm.models.common.vlm import zero_gradient_anchor


def _projection(in_size: int, out_size: int, bias: bool) -> torch.nn.Linear:
    """CLIP initialises its projections at std width^-0.5."""
    linear = torch.nn.Linear(in_size, out_size, bias=bias)
    torch.nn.init.normal_(linear.weight, std=in_size ** -0.5)
    if bias:
        torch.nn.init.zeros_(linear.bias)
    return linear


class ContrastiveModel(MegatronModule):
    model_type = ModelType.encoder_or_decoder

    def __init__(self, model: ModelConfig, parallel: ParallelConfig, pg_collection=None, pre_process: bool = True,
                 post_process: bool = True, dtype: torch.dtype = torch.float32, recompute: bool = False):
        if not (pre_process and post_process):
            raise ValueError("a contrastive model (family clip) is not pipelined: use pipeline_parallel: 1")
        text_parallel = dataclasses.replace(parallel, pipeline_parallel=1, first_stage_layers=None,
                                            last_stage_layers=None)
        text_config = language_transformer_config(model, text_parallel, dtype, recompute)
        super().__init__(config=text_config)
        c = model.contrastive
        self.model_config = model
        self.pre_process = self.post_process = True
        self.dp_group = pg_collection.dp if pg_collection is not None else None
        self.vision = build_vision_tower(model, parallel, pg_collection, dtype, recompute)
        self.image_pool = tag_component(image_pooler(model, self._vision_config(parallel, dtype), pg_collection),
                                        "vision")
        spec = block_spec(text_encoder_layer_spec(model), model.transformer_impl, text_config)
        self.text = tag_component(TextTransformer(model.language, text_config, spec, c.text_pooling == "mean",
                                                  pg_collection), "text")
        self.text_pool = text_pooler(model)
        self.image_projection = tag_component(
            _projection(model.vision.hidden_size, c.embed_dim, bias=False) if c.image_projection
            else torch.nn.Identity(), "connector")
        self.text_projection = tag_component(_projection(model.language.hidden_size, c.embed_dim,
                                                         c.text_projection_bias), "connector")
        self.objective = tag_component(build_objective(c), "connector")

    def _vision_config(self, parallel: ParallelConfig, dtype: torch.dtype):
        """The ViT's TransformerConfig (the attention pooling's linears are shaped like its layers)."""
        if self.model_config.vision.tensor_parallel == 1:
            from megavlm.models.common.replicated import whole_parallel

            parallel = whole_parallel(parallel)
        return vision_transformer_config(self.model_config, parallel, dtype)

    def set_input_tensor(self, input_tensor) -> None:
        """Never pipelined: there is no pipeline input to take."""

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] -> L2-normalised embeddings [n, embed_dim]."""
        pooled = self.image_pool(self.vision(images))
        return F.normalize(self.image_projection(pooled).float(), dim=-1)

    def embed_texts(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """token ids [b, s] and mask [b, s] (1 = real token) -> L2-normalised embeddings [b, embed_dim]."""
        pooled = self.text_pool(self.text(text_ids, text_mask), text_mask)
        return F.normalize(self.text_projection(pooled).float(), dim=-1)

    def forward(self, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor, **_unused) -> dict:
        """The objective on one micro-batch of pairs: {name: (loss sum over its rows, rows)}. A
        micro-batch whose samples were all skipped still joins the other ranks' gathers, with no
        rows and a zero gradient for every parameter (so gradient buckets complete)."""
        if not images.shape[0]:
            empty = images.new_zeros(0, self.model_config.contrastive.embed_dim) + zero_gradient_anchor(self)
            return self.objective(empty, empty, self.dp_group)
        return self.objective(self.embed_images(images), self.embed_texts(text_ids, text_mask), self.dp_group)
