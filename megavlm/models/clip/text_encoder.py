"""The text tower of a contrastive model: token + learned position embeddings (vocab-parallel
over TP), megatron-core transformer layers (causal for CLIP, bidirectional for SigLIP) and a
final norm. Rows are [b, s] token ids; the output is [b, s, hidden], whole on every TP rank."""
from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from megavlm.config.model import LanguageConfig
from megavlm.models.common.language_model import padded_vocab_size


class TextTransformer(MegatronModule):
    """``mask_padding``: padding keys are hidden from every query (needed when the pooling
    averages the real tokens of a bidirectional encoder; CLIP's causal EOT token never sees the
    padding after it, and SigLIP reads its padded rows whole, as it was trained)."""

    def __init__(self, language: LanguageConfig, config: TransformerConfig, block_spec, mask_padding: bool = False,
                 pg_collection=None):
        super().__init__(config=config)
        tp_group = pg_collection.tp if pg_collection is not None else None
        self.mask_padding = mask_padding
        self.embedding = LanguageModelEmbedding(
            config, padded_vocab_size(language.vocab_size, config.tensor_model_parallel_size), language.max_seq_len,
            position_embedding_type="learned_absolute", scatter_to_sequence_parallel=False, tp_group=tp_group)
        self.encoder = TransformerBlock(config=config, spec=block_spec, post_layer_norm=True, pre_process=True,
                                        post_process=True, pg_collection=pg_collection)

    def set_input_tensor(self, input_tensor):  # never pipelined
        pass

    def forward(self, text_ids: torch.Tensor, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """text_ids [b, s] (text_mask [b, s], 1 = real token) -> hidden states [b, s, hidden]."""
        positions = torch.arange(text_ids.shape[1], device=text_ids.device).expand_as(text_ids)
        x = self.embedding(input_ids=text_ids, position_ids=positions)          # [s, b, h]
        mask = None
        if self.mask_padding and text_mask is not None:
            mask = ~text_mask.bool()[:, None, None, :]                            # True = masked key
        return self.encoder(x, attention_mask=mask).transpose(0, 1)
