"""Flamingo (IDEFICS): frozen ViT -> Perceiver resampler -> media latents, read by gated
cross-attention blocks inside a frozen decoder LLM. Text keeps one <image> marker per image.

Pipeline parallelism. Cross-attention blocks sit in every pipeline stage, but the ViT and the
resampler live on the first. The first stage computes the latents once and sends them *with the
hidden states*: each micro-batch's latents ([max_media, latents, vision width] per sample,
zero-padded) are flattened into ``pipeline_extra_rows`` extra rows of width ``hidden`` appended
to the [seq, batch, hidden] tensor the schedule passes between stages. Every stage reads them
and forwards them unchanged; in the backward pass the gradients of all stages' blocks flow back
to the resampler through those rows. The media mask is rebuilt on each stage from the token ids.
Cost: rows = ceil(max_media * latents * vision_width / hidden), e.g. 100 rows for 5 images of
64 x 1280 latents on a 4096-wide LLM, 5% over a 2048-token sequence. The alternative, running
the vision path on every stage, would replicate the trainable resampler across stages and need
its gradients all-reduced between them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megavlm.config.model import ModelConfig, ParallelConfig
from megavlm.models.common.language_model import build_language_model
from megavlm.models.common.layer_specs import decoder_layer_spec, output_layer_cls
from megavlm.models.common.tags import tag_component
from megavlm.models.common.transformer_config import (
    language_transformer_config,
    resampler_transformer_config,
)
from megavlm.models.common.vision_transformer import build_vision_tower
from megavlm.models.common.vlm import LanguageModelHost, run_frozen_aware, zero_gradient_anchor
from megavlm.models.flamingo.fusion import Fusion, fusion_layer_spec, media_mask
from megavlm.models.flamingo.resampler import PerceiverResampler


class FlamingoModel(LanguageModelHost):
    def __init__(self, model: ModelConfig, parallel: ParallelConfig, pg_collection=None, pre_process: bool = True,
                 post_process: bool = True, dtype: torch.dtype = torch.float32, recompute: bool = False):
        if parallel.sequence_parallel:
            raise ValueError("flamingo does not support parallel.sequence_parallel: the media latents travel "
                             "with the whole sequence")
        lm_config = language_transformer_config(model, parallel, dtype, recompute)
        super().__init__(config=lm_config)
        self.model_config, self.flamingo = model, model.flamingo
        self.pre_process, self.post_process = pre_process, post_process
        self.pipelined = parallel.pipeline_parallel > 1
        tp_group = pg_collection.tp if pg_collection is not None else None
        width = model.vision.hidden_size
        self.vision = self.resampler = None
        if pre_process:
            self.vision = build_vision_tower(model, parallel, pg_collection, dtype, recompute)
            if not model.flamingo.use_resampler:
                resampler = None
            elif model.connector.tensor_parallel == 1:
                from megavlm.models.common.replicated import build_whole, whole_parallel

                resampler = build_whole(PerceiverResampler, pg_collection, model.flamingo,
                                        resampler_transformer_config(model, whole_parallel(parallel), dtype), width,
                                        pg_collection.solo)
            else:
                resampler = PerceiverResampler(model.flamingo, resampler_transformer_config(model, parallel, dtype),
                                               width, tp_group)
            self.resampler = tag_component(resampler, "connector") if resampler is not None else None
        spec = fusion_layer_spec(decoder_layer_spec(model.transformer_impl),
                                 Fusion(model.flamingo, width, model.language.num_layers))
        language_model = build_language_model(model.language, lm_config, model.transformer_impl, pg_collection,
                                              pre_process, post_process, layer_spec=spec,
                                              output_layer_cls=output_layer_cls(model))
        self.language_model = tag_component(language_model, "llm")
        for layer in self.language_model.decoder.layers:
            if layer.gated_xattn is not None:
                tag_component(layer.gated_xattn, "fusion")
        latent_values = model.flamingo.max_media * model.media_tokens * width
        self.pipeline_extra_rows = math.ceil(latent_values / model.language.hidden_size) if self.pipelined else 0
        self._received = None

    def set_input_tensor(self, input_tensor) -> None:
        self._received = input_tensor[0] if isinstance(input_tensor, (list, tuple)) else input_tensor

    # ---- media --------------------------------------------------------------------------------
    def media_latents(self, images: torch.Tensor | None, images_per_sample: torch.Tensor, batch: int) -> torch.Tensor:
        """Images [n, 3, H, W] (or [n, frames, 3, H, W]), in sample order -> latents
        [batch, slots, latents, width], zero where a sample has fewer images than slots."""
        f, width = self.flamingo, self.model_config.vision.hidden_size
        most = int(images_per_sample.max()) if images_per_sample.numel() else 0
        if most > f.max_media:
            raise ValueError(f"a sample has {most} images; flamingo.max_media is {f.max_media}")
        slots = f.max_media if self.pipelined else max(most, 1)
        dtype = self.language_model.embedding.word_embeddings.weight.dtype
        out = torch.zeros(batch, slots, self.model_config.media_tokens, width, dtype=dtype, device=images_per_sample.device)
        if images is None or images.shape[0] == 0:
            return out + zero_gradient_anchor(self.vision, self.resampler)
        frames = images.dim() == 5
        features = run_frozen_aware(self.vision, images.flatten(0, 1) if frames else images)
        if frames:
            features = features.view(*images.shape[:2], *features.shape[1:])
        latents = self.resampler(features) if self.resampler is not None else features
        sample = torch.repeat_interleave(torch.arange(batch, device=out.device), images_per_sample)
        first = torch.cumsum(images_per_sample, 0) - images_per_sample
        slot = torch.arange(latents.shape[0], device=out.device) - first[sample]
        out[sample, slot] = latents.to(dtype)
        return out

    def _pack(self, latents: torch.Tensor) -> torch.Tensor:
        """[b, slots, latents, width] -> [extra_rows, b, hidden] for the pipeline."""
        flat = latents.flatten(1)
        rows, hidden = self.pipeline_extra_rows, self.config.hidden_size
        flat = F.pad(flat, (0, rows * hidden - flat.shape[1]))
        return flat.view(flat.shape[0], rows, hidden).transpose(0, 1)

    def _unpack(self, rows: torch.Tensor) -> torch.Tensor:
        f, width = self.flamingo, self.model_config.vision.hidden_size
        flat = rows.transpose(0, 1).reshape(rows.shape[1], -1)
        tokens = self.model_config.media_tokens
        return flat[:, : f.max_media * tokens * width].view(rows.shape[1], f.max_media, tokens, width)

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, images=None, images_per_sample=None, position_ids=None,
                attention_mask=None, packed_seq_params=None) -> torch.Tensor:
        """Logits [b, s, vocab/TP] (or hidden states for a fused loss head) on the last stage;
        elsewhere the [s + pipeline_extra_rows, b, hidden] tensor for the next stage."""
        cfg, (batch, seq) = self.model_config, input_ids.shape
        if images_per_sample is None:
            images_per_sample = torch.zeros(batch, dtype=torch.long, device=input_ids.device)
        if self.pre_process:
            latents = self.media_latents(images, images_per_sample, batch)
            if position_ids is None:
                position_ids = torch.arange(seq, device=input_ids.device).expand_as(input_ids)
            decoder_input = self.language_model.embedding(input_ids=input_ids, position_ids=position_ids)
        else:
            received = self._received
            rows = received[seq:]
            latents = self._unpack(rows)
            self.language_model.set_input_tensor(received[:seq])
            decoder_input = None
        cu_seqlens = packed_seq_params.cu_seqlens_q if packed_seq_params is not None else None
        mask = media_mask(input_ids, images_per_sample, cfg.image_token_id, latents.shape[1], cfg.media_tokens,
                          self.flamingo.media_attention == "all_previous", cu_seqlens)
        context = latents.flatten(1, 2).transpose(0, 1)                     # [slots * latents, b, width]
        output = self.language_model(input_ids=None, position_ids=None, attention_mask=attention_mask,
                                     decoder_input=decoder_input, packed_seq_params=packed_seq_params,
                                     extra_block_kwargs={"context": context, "context_mask": mask})
        if self.post_process:
            return output
        return torch.cat([output, rows if not self.pre_process else self._pack(latents)])
