"""LLaVA: ViT -> MLP projector -> image embeddings at <image> positions -> decoder LLM.

Composition only. Under pipeline parallelism the first stage holds the ViT, the connector and
the token embedding; the decoder layers are split over the stages; the last holds the output
layer (the loss is computed outside, on the logits).
"""
from __future__ import annotations

import torch

from megavlm.config.model import ModelConfig, ParallelConfig
from megavlm.models.common.image_tokens import scatter_image_embeddings
from megavlm.models.common.language_model import build_language_model
from megavlm.models.common.layer_specs import connector_cls, encoder_layer_spec, norm_spec, prepare_language_model
from megavlm.models.common.tags import tag_component
from megavlm.models.common.vlm import VLMBase
from megavlm.models.common.transformer_config import language_transformer_config, vision_transformer_config
from megavlm.models.common.vision_transformer import VisionTransformer


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
            vit_config = vision_transformer_config(model, parallel, dtype, recompute)
            self.vision = tag_component(VisionTransformer(model.vision, vit_config, encoder_layer_spec(model.transformer_impl),
                                                          norm_spec(model.transformer_impl), pg_collection), "vision")
            self.connector = tag_component(connector_cls(model)(model.connector, model.vision.hidden_size,
                                                                model.language.hidden_size, lm_config, tp_group),
                                           "connector")
        language_model = build_language_model(model.language, lm_config, model.transformer_impl, pg_collection,
                                              pre_process, post_process)
        self.language_model = tag_component(prepare_language_model(model, language_model), "llm")

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] -> [n, tokens, llm_hidden]. A frozen ViT runs without autograd."""
        if any(p.requires_grad for p in self.vision.parameters()):
            features = self.vision(images)
        else:
            with torch.no_grad():
                features = self.vision(images)
        return self.connector(features)

    def embed(self, input_ids: torch.Tensor, images=None, images_per_sample=None, position_ids=None) -> torch.Tensor:
        """Token embeddings [s, b, h] with image embeddings at the <image> positions."""
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        embeddings = self.language_model.embedding(input_ids=input_ids, position_ids=position_ids)
        if images is None:
            images = embeddings.new_zeros(0, 3, self.model_config.vision.image_size, self.model_config.vision.image_size)
        image_embeds = (self.image_embeddings(images) if images.shape[0] else
                        embeddings.new_zeros(0, self.model_config.vision.tokens_per_image, embeddings.shape[-1]))
        return scatter_image_embeddings(embeddings, input_ids, image_embeds, self.model_config.image_token_id,
                                        images_per_sample)

    def forward(self, input_ids: torch.Tensor, images=None, images_per_sample=None, position_ids=None,
                attention_mask=None, packed_seq_params=None) -> torch.Tensor:
        """First stage: from tokens and images; later stages: from the pipeline input.
        Returns logits [b, s, vocab/TP] on the last stage, hidden states [s, b, h] elsewhere."""
        decoder_input = self.embed(input_ids, images, images_per_sample, position_ids) if self.pre_process else None
        return self.language_model(input_ids=None, position_ids=None, attention_mask=attention_mask,
                                   decoder_input=decoder_input, packed_seq_params=packed_seq_params)
