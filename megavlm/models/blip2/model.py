"""BLIP-2: frozen ViT -> Q-Former (32 queries) -> linear projection -> soft prompt of a frozen LLM.

Two compositions of the same parts:

* ``Blip2Model`` (``head: lm``): stage 2, generative pre-training, and HF
  ``Blip2ForConditionalGeneration`` parity. The projected queries fill the <image> positions of
  the LLM input (OPT or Llama-style decoder); pipeline-parallel like LLaVA.
* ``Blip2RepresentationModel`` (``head: qformer``): stage 1, representation learning. No LLM; the
  Q-Former's text path and the ITC/ITM/ITG heads; forward returns the three losses
  (losses/blip2.py). Tensor- and data-parallel (ITC negatives gathered over DP).
"""
from __future__ import annotations

import dataclasses

import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from megavlm.config.model import ModelConfig, ParallelConfig
from megavlm.models.common.language_model import build_language_model, padded_vocab_size
from megavlm.models.common.layer_specs import output_layer_cls
from megavlm.models.common.tags import tag_component
from megavlm.models.common.transformer_config import (
    language_transformer_config,
    qformer_transformer_config,
    without_sequence_parallel,
)
from megavlm.models.common.vision_transformer import build_vision_tower
from megavlm.models.common.vlm import VLMBase, run_frozen_aware
from megavlm.models.connectors.qformer import QFormer


class Blip2Model(VLMBase):
    def __init__(self, model: ModelConfig, parallel: ParallelConfig, pg_collection=None, pre_process: bool = True,
                 post_process: bool = True, dtype: torch.dtype = torch.float32, recompute: bool = False):
        lm_config = language_transformer_config(model, parallel, dtype, recompute)
        super().__init__(config=lm_config)
        self.model_config = model
        self.pre_process, self.post_process = pre_process, post_process
        self.vision = self.qformer = self.language_projection = None
        tp_group = pg_collection.tp if pg_collection is not None else None
        if pre_process:
            self.vision = build_vision_tower(model, parallel, pg_collection, dtype, recompute)
            # generation reads only the query outputs: no text path (as in HF's model)
            qformer = dataclasses.replace(model.qformer, text_input=False)
            if model.connector.tensor_parallel == 1:
                from megavlm.models.common.replicated import build_whole, whole_parallel

                q_config = qformer_transformer_config(model, whole_parallel(parallel), dtype)
                module = build_whole(QFormer, pg_collection, qformer, q_config, model.vision.hidden_size,
                                     pg_collection.solo)
            else:
                module = QFormer(qformer, qformer_transformer_config(model, parallel, dtype), model.vision.hidden_size,
                                 tp_group)
            self.qformer = tag_component(module, "connector")
            self.language_projection = tag_component(ColumnParallelLinear(
                model.qformer.hidden_size, model.language.hidden_size, config=without_sequence_parallel(lm_config),
                init_method=lm_config.init_method, bias=True, gather_output=True, tp_group=tp_group), "connector")
        language_model = build_language_model(model.language, lm_config, model.transformer_impl, pg_collection,
                                              pre_process, post_process, output_layer_cls=output_layer_cls(model))
        self.language_model = tag_component(language_model, "llm")

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] -> the projected query outputs [n, num_query_tokens, llm_hidden]."""
        queries = self.qformer(image=run_frozen_aware(self.vision, images))
        return self.language_projection(queries)[0]


class Blip2RepresentationModel(MegatronModule):
    model_type = ModelType.encoder_or_decoder

    def __init__(self, model: ModelConfig, parallel: ParallelConfig, pg_collection=None, pre_process: bool = True,
                 post_process: bool = True, dtype: torch.dtype = torch.float32, recompute: bool = False):
        if not (pre_process and post_process):
            raise ValueError("BLIP-2 stage 1 (head: qformer) has no LLM to pipeline: use pipeline_parallel: 1")
        q = model.qformer
        q_config = qformer_transformer_config(model, parallel, dtype)
        super().__init__(config=q_config)
        self.model_config = model
        self.pre_process = self.post_process = True
        self.tp_group = pg_collection.tp if pg_collection is not None else None
        self.dp_group = pg_collection.dp if pg_collection is not None else None
        self.vision = build_vision_tower(model, parallel, pg_collection, dtype)
        self.qformer = tag_component(QFormer(q, q_config, model.vision.hidden_size, self.tp_group), "connector")
        heads = torch.nn.ModuleDict({
            "vision_projection": torch.nn.Linear(q.hidden_size, q.embed_dim),
            "text_projection": torch.nn.Linear(q.hidden_size, q.embed_dim),
            "itm": torch.nn.Linear(q.hidden_size, 2),
            "itg_transform": torch.nn.Linear(q.hidden_size, q.hidden_size),
            "itg_norm": torch.nn.LayerNorm(q.hidden_size, eps=q.norm_eps),
        })
        self.heads = tag_component(heads, "connector")
        vocab_local = padded_vocab_size(q.vocab_size, q_config.tensor_model_parallel_size) // q_config.tensor_model_parallel_size
        self.itg_bias = torch.nn.Parameter(torch.zeros(vocab_local))
        tensor_parallel.set_tensor_model_parallel_attributes(self.itg_bias, True, 0, 1)
        self.temp = torch.nn.Parameter(torch.tensor(0.07))   # ITC temperature (learned, clamped to [0.001, 0.5])
        for param in (self.itg_bias, self.temp):
            param.megavlm_component = "connector"

    def set_input_tensor(self, input_tensor) -> None:
        """Stage 1 is never pipelined: there is no pipeline input to take."""

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return run_frozen_aware(self.vision, images)

    def itg_logits(self, text_hidden: torch.Tensor) -> torch.Tensor:
        """BERT LM head tied to the (vocab-parallel) word embeddings: [b, L, h] -> [b, L, V/TP]."""
        h = torch.nn.functional.gelu(self.heads["itg_transform"](text_hidden))
        h = self.heads["itg_norm"](h)
        # each rank multiplies by its vocab shard: the input gradient is a sum over TP ranks
        h = copy_to_tensor_model_parallel_region(h, group=self.tp_group)
        return h @ self.qformer.word_embeddings.weight.t() + self.itg_bias

    def forward(self, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor, **_unused) -> dict:
        """ITC, ITM and ITG on one micro-batch: {name: (loss sum, normaliser)}."""
        from megavlm.losses.blip2 import stage1_losses

        return stage1_losses(self, images, text_ids, text_mask)
