"""Base of the families that feed images to the LLM as embeddings at <image> positions (LLaVA,
BLIP-2 stage 2, InternVL), and what megatron-core's schedules and DDP ask of any model around
an LLM (``LanguageModelHost``, also Flamingo's base)."""
from __future__ import annotations

import abc

import torch
from megatron.core.tensor_parallel.mappings import scatter_to_sequence_parallel_region
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from megavlm.models.common.image_tokens import scatter_image_embeddings
from megavlm.models.common.prefix_lm import prefix_lm_attention


def run_frozen_aware(module: torch.nn.Module, *args):
    """module(*args), without autograd when none of its parameters trains (no stored activations)."""
    if any(p.requires_grad for p in module.parameters()):
        return module(*args)
    with torch.no_grad():
        return module(*args)


def zero_gradient_anchor(*modules) -> torch.Tensor | float:
    """0 x (one element of every trainable parameter of ``modules``): adds nothing, but gives each
    of them a (zero) gradient. megatron-core's overlapped gradient reduce starts a bucket's
    reduce once every parameter in it has reported a gradient in the last micro-batch; a text-only
    micro-batch would otherwise never report the image path's and the step would stop there."""
    params = [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]
    if not params or not torch.is_grad_enabled():
        return 0.0
    return torch.stack([p.reshape(-1)[0] for p in params]).sum() * 0.0


class LanguageModelHost(MegatronModule):
    """A model around ``language_model`` (a GPTModel chunk): what megatron-core's schedules,
    DDP and the loss heads ask of it."""

    model_type = ModelType.encoder_or_decoder

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.language_model.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self):
        """The tied word embedding, all-reduced between the first and last stage."""
        return self.language_model.shared_embedding_or_output_weight()

    def output_weight(self):
        """The weight that turns final hidden states into (vocab-sharded) logits, last stage only."""
        from megavlm.models.common.language_model import output_weight

        return output_weight(self.language_model)


class VLMBase(LanguageModelHost, abc.ABC):
    """Holds ``language_model`` and, on the first pipeline stage, whatever
    ``image_embeddings(images) -> [n, image_tokens, llm_hidden]`` needs."""

    @abc.abstractmethod
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] -> [n, image_tokens, llm_hidden]."""

    def image_path(self) -> list:
        """The modules between the pixels and the LLM (vision encoder, connectors)."""
        return [child for name, child in self.named_children() if name != "language_model"]

    def embed(self, input_ids: torch.Tensor, images=None, images_per_sample=None, position_ids=None) -> torch.Tensor:
        """Token embeddings [s, b, h] with image embeddings at the <image> positions. Under
        sequence parallelism the whole sequence is assembled first (an image's tokens may
        straddle two ranks' slices) and then scattered once: [s/TP, b, h]."""
        cfg = self.model_config
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        embedding = self.language_model.embedding
        embeddings = embedding(input_ids=input_ids, position_ids=position_ids)
        if images is not None and images.shape[0]:
            image_embeds = self.image_embeddings(images)
        else:
            image_embeds = embeddings.new_zeros(0, cfg.image_tokens, embeddings.shape[-1])
        merged = scatter_image_embeddings(embeddings, input_ids, image_embeds, cfg.image_token_id, images_per_sample)
        if not image_embeds.shape[0]:
            merged = merged + zero_gradient_anchor(*self.image_path())
        if embedding.add_position_embedding and image_embeds.shape[0]:
            # Learned absolute positions (OPT) belong to every position, image slots included; the
            # embedding added them before the image embeddings replaced those slots.
            is_image = (input_ids == cfg.image_token_id).t().unsqueeze(-1)
            merged = merged + embedding.position_embeddings(position_ids).transpose(0, 1) * is_image
        if self.config.sequence_parallel:
            merged = scatter_to_sequence_parallel_region(merged, group=self.language_model.pg_collection.tp)
        return merged

    def forward(self, input_ids: torch.Tensor | None = None, images=None, images_per_sample=None, position_ids=None,
                attention_mask=None, packed_seq_params=None, decoder_input=None, inference_context=None,
                prefix_lengths=None) -> torch.Tensor:
        """First stage: from tokens and images (or from ``decoder_input``, embeddings generation
        made already); later stages: from the pipeline input. Returns logits [b, s, vocab/TP] (or
        hidden states for a fused loss head) on the last stage, hidden states [s, b, h] elsewhere.
        ``inference_context``: megatron-core's KV cache (eval/generate.py); the logits of the last
        position only then come back, gathered over TP as megatron-core requires there.
        ``prefix_lengths`` (prefix-LM models): each row's (or packed segment's) bidirectional
        prefix, turned into the attention mask here (models/common/prefix_lm.py)."""
        attention_mask, packed_seq_params = self._attention_inputs(input_ids, attention_mask, packed_seq_params,
                                                                   inference_context, prefix_lengths)
        if decoder_input is None and self.pre_process:
            decoder_input = self.embed(input_ids, images, images_per_sample, position_ids)
        return self.language_model(input_ids=None, position_ids=None, attention_mask=attention_mask,
                                   decoder_input=decoder_input, packed_seq_params=packed_seq_params,
                                   inference_context=inference_context,
                                   runtime_gather_output=True if inference_context is not None else None)

    def _attention_inputs(self, input_ids, attention_mask, packed_seq_params, inference_context, prefix_lengths):
        """A prefix-LM model's layers take whatever mask they are given, so one must come: from
        ``prefix_lengths`` or explicitly (generation's prefill); only a step decoding from the KV
        cache attends to everything cached without one."""
        if not self.model_config.prefix_lm:
            if prefix_lengths is not None:
                raise ValueError("prefix_lengths given to a causal model (model.prefix_lm is false)")
            return attention_mask, packed_seq_params
        if prefix_lengths is not None:
            if input_ids is None:
                raise ValueError("prefix_lengths needs input_ids for the sequence length; pass an attention mask")
            return prefix_lm_attention(prefix_lengths, input_ids.shape[1], packed_seq_params)
        decoding = inference_context is not None and inference_context.sequence_len_offset > 0
        if attention_mask is None and not decoding:
            raise ValueError("a prefix-LM model (model.prefix_lm) needs each sample's prefix_lengths or an attention "
                             "mask")
        return attention_mask, packed_seq_params
