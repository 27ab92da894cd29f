"""BLIP-2's Q-Former on tensor-parallel megatron-core linears.

BERT-style post-LayerNorm layers over [32 learned queries; text tokens]. Queries cross-attend to
the frozen image features every ``cross_attention_freq`` layers; queries and text have separate
feed-forward networks; self-attention runs under a mask the objective chooses (all-to-all for
ITM, queries-only for the image path, text-only for ITC's text path, causal text over queries
for ITG). Attention heads and FFN columns are split over TP; norms and embeddings of positions
are replicated, word embeddings vocab-parallel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megavlm.config.model import QFormerConfig
from megavlm.models.common.language_model import padded_vocab_size
from megavlm.models.common.module_list import ShardedModuleList
from megavlm.models.common.parallel_attention import ParallelAttention


class ParallelFFN(MegatronModule):
    """Linear -> GELU -> Linear, column- then row-parallel (one all-reduce)."""

    def __init__(self, config: TransformerConfig, hidden: int, ffn: int, tp_group=None):
        super().__init__(config=config)
        self.linear_fc1 = ColumnParallelLinear(hidden, ffn, config=config, init_method=config.init_method, bias=True,
                                               gather_output=False, tp_group=tp_group)
        self.linear_fc2 = RowParallelLinear(ffn, hidden, config=config, init_method=config.output_layer_init_method,
                                            bias=True, input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.gelu(self.linear_fc1(x)[0]))[0]


class QFormerLayer(MegatronModule):
    def __init__(self, q: QFormerConfig, config: TransformerConfig, vision_dim: int, has_cross: bool, tp_group=None):
        super().__init__(config=config)
        # dummy heads (qformer.padded_heads) keep the real head size
        h, heads = q.hidden_size, q.built_heads
        self.attention = ParallelAttention(config, h, h, heads, q.head_dim, tp_group=tp_group)
        self.attention_norm = torch.nn.LayerNorm(h, eps=q.norm_eps)
        self.cross_attention = (ParallelAttention(config, h, vision_dim, heads, q.head_dim, tp_group=tp_group)
                                if has_cross else None)
        self.cross_norm = torch.nn.LayerNorm(h, eps=q.norm_eps) if has_cross else None
        self.mlp_query = ParallelFFN(config, h, q.ffn_hidden_size, tp_group)
        self.mlp_query_norm = torch.nn.LayerNorm(h, eps=q.norm_eps)
        self.mlp_text = ParallelFFN(config, h, q.ffn_hidden_size, tp_group) if q.text_input else None
        self.mlp_text_norm = torch.nn.LayerNorm(h, eps=q.norm_eps) if q.text_input else None

    def forward(self, hidden: torch.Tensor, mask, query_len: int, image: torch.Tensor | None) -> torch.Tensor:
        """hidden [s, b, h] = [queries; text]; image [si, b, vision_dim]."""
        hidden = self.attention_norm(hidden + self.attention(hidden, mask=mask))
        queries, text = hidden[:query_len], hidden[query_len:]
        parts = []
        if query_len:
            if self.cross_attention is not None:
                queries = self.cross_norm(queries + self.cross_attention(queries, image))
            parts.append(self.mlp_query_norm(queries + self.mlp_query(queries)))
        if text.shape[0]:
            if self.mlp_text is None:
                raise ValueError("this Q-Former has no text path (qformer.text_input: false)")
            parts.append(self.mlp_text_norm(text + self.mlp_text(text)))
        return torch.cat(parts) if len(parts) > 1 else parts[0]


class QFormer(MegatronModule):
    def __init__(self, q: QFormerConfig, config: TransformerConfig, vision_dim: int, tp_group=None):
        super().__init__(config=config)
        self.q = q
        h = q.hidden_size
        self.query_tokens = torch.nn.Parameter(torch.randn(q.num_query_tokens, h) * config.init_method_std)
        self.layernorm = torch.nn.LayerNorm(h, eps=q.norm_eps)
        if q.text_input:
            vocab = padded_vocab_size(q.vocab_size, config.tensor_model_parallel_size)
            self.word_embeddings = VocabParallelEmbedding(vocab, h, init_method=config.init_method,
                                                          config=config, tp_group=tp_group)
            self.position_embeddings = torch.nn.Embedding(q.max_position_embeddings, h)
        self.layers = ShardedModuleList(
            QFormerLayer(q, config, vision_dim, i % q.cross_attention_freq == 0, tp_group) for i in range(q.num_layers))

    def embed_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        """[b, L] -> [L, b, h]: word + learned position embeddings (positions from 0)."""
        if text_ids.shape[1] > self.q.max_position_embeddings:
            raise ValueError(f"{text_ids.shape[1]} text tokens exceed qformer.max_position_embeddings "
                             f"{self.q.max_position_embeddings}")
        words = self.word_embeddings(text_ids.t().contiguous())               # [L, b, h]
        positions = self.position_embeddings.weight[: text_ids.shape[1]].unsqueeze(1)
        return words + positions

    def forward(self, image: torch.Tensor | None = None, text_ids: torch.Tensor | None = None, mask=None,
                use_queries: bool = True) -> torch.Tensor:
        """image [b, si, vision_dim]; text_ids [b, L]; mask [b, 1, s, s] (True = masked) over
        [queries; text]. Returns hidden states [b, s, h]."""
        parts = []
        batch = (image if image is not None else text_ids).shape[0]
        if use_queries:
            parts.append(self.query_tokens.unsqueeze(1).expand(-1, batch, -1))
        if text_ids is not None:
            parts.append(self.embed_text(text_ids))
        hidden = self.layernorm(torch.cat(parts) if len(parts) > 1 else parts[0])
        context = image.transpose(0, 1) if image is not None else None
        query_len = self.q.num_query_tokens if use_queries else 0
        for layer in self.layers:
            hidden = layer(hidden, mask, query_len, context)
        return hidden.transpose(0, 1)
