"""LLaVA: ViT -> MLP projector -> image embeddings at <image> positions -> decoder LLM.

Composition only. Under pipeline parallelism the first stage holds the ViT, the connector and
the token embedding; the decoder layers are split over the stages; the last holds the output
layer (the loss is computed outside, on the logits).
"""
from __future__ import annotations

import torch

from megavlm.config.model import ModelConfig, ParallelConfig
from megavlm.models.common.language_model import build_language_model
from megavlm.models.common.layer_specs import connector_cls, output_layer_cls
from megavlm.models.common.tags import tag_component
from megavlm.models.common.vlm import VLMBase, run_frozen_aware
from megavlm.models.common.transformer_config import language_transformer_config, without_sequence_parallel
from megavlm.models.common.vision_transformer import build_vision_tower


class LlavaModel(VLMBase):
    def __init__(self, model: ModelConfig, parallel: ParallelConfig, pg_collection=None, pre_process: bool = True,
                 post_process: bool = True, dtype: torch.dtype = torch.float32, recompute: bool = False):
        lm_config = language_transformer_config(model, parallel, dtype, recompute)
        super().__init__(config=lm_config)
        self.model_config = model
        self.pre_process, self.post_process = pre_process, post_process
        self.vision = self.connector = None
        tp_group = pg_collection.tp if pg_collection is not None else None
        if pre_process:
            self.vision = build_vision_tower(model, parallel, pg_collection, dtype, recompute)
            connector = connector_cls(model)(model.connector, model.vision.hidden_size, model.language.hidden_size,
                                             without_sequence_parallel(lm_config), tp_group)
            self.connector = tag_component(connector, "connector")
        language_model = build_language_model(model.language, lm_config, model.transformer_impl, pg_collection,
                                              pre_process, post_process, output_layer_cls=output_layer_cls(model),
                                              prefix_lm=model.prefix_lm)
        self.language_model = tag_component(language_model, "llm")

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] -> [n, tokens, llm_hidden]. A frozen ViT runs without autograd."""
        return self.connector(run_frozen_aware(self.vision, images))
