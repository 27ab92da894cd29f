"""Fuyu: raw image patches -> one linear projection -> the decoder, with the text.

Composition only. An image reaches the model as its patches ([patches, 3 * p * p], data/patches.py),
each one decoder position: the projection's outputs take the ``<image>`` positions of the token
embeddings (the image-newline tokens between rows are ordinary embeddings). Under pipeline
parallelism the first stage holds the projection and the token embedding.
"""
from __future__ import annotations

import torch

from megavlm.config.model import ModelConfig, ParallelConfig
from megavlm.models.common.language_model import build_language_model
from megavlm.models.common.layer_specs import connector_cls, output_layer_cls
from megavlm.models.common.tags import tag_component
from megavlm.models.common.transformer_config import language_transformer_config, without_sequence_parallel
from megavlm.models.common.vlm import VLMBase


class FuyuModel(VLMBase):
    def __init__(self, model: ModelConfig, parallel: ParallelConfig, pg_collection=None, pre_process: bool = True,
                 post_process: bool = True, dtype: torch.dtype = torch.float32, recompute: bool = False):
        lm_config = language_transformer_config(model, parallel, dtype, recompute)
        super().__init__(config=lm_config)
        self.model_config = model
        self.pre_process, self.post_process = pre_process, post_process
        self.connector = None
        tp_group = pg_collection.tp if pg_collection is not None else None
        if pre_process:
            projection = connector_cls(model)(model.connector, model.patches.patch_dim, model.language.hidden_size,
                                              without_sequence_parallel(lm_config), tp_group)
            self.connector = tag_component(projection, "connector")
        language_model = build_language_model(model.language, lm_config, model.transformer_impl, pg_collection,
                                              pre_process, post_process, output_layer_cls=output_layer_cls(model),
                                              prefix_lm=model.prefix_lm)
        self.language_model = tag_component(language_model, "llm")

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Patches [n, 3 * p * p] -> [n, 1, llm_hidden]: each patch fills one position."""
        if images.dim() != 2 or images.shape[1] != self.model_config.patches.patch_dim:
            raise ValueError(f"image inputs have shape {tuple(images.shape)}; Fuyu takes patches "
                             f"[n, {self.model_config.patches.patch_dim}] (data/patches.py)")
        return self.connector(images.to(self.connector.linear_fc1.weight.dtype)).unsqueeze(1)
