"""Decoder-only language model: megatron-core's GPTModel with the spec from layer_specs."""
from __future__ import annotations

from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megavlm.config.model import LanguageConfig
from megavlm.models.common.layer_specs import decoder_layer_spec


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    """Vocab-parallel layers need a vocabulary divisible by TP; the padding rows are never
    looked up and their logits are excluded by the loss (losses/lm_loss.py)."""
    return -(-vocab_size // tp_size) * tp_size


def build_language_model(language: LanguageConfig, config: TransformerConfig, impl: str, pg_collection=None,
                         pre_process: bool = True, post_process: bool = True) -> GPTModel:
    """Llama-style (RMSNorm, SwiGLU, RoPE, GQA) or OPT-style (LayerNorm, ReLU, learned positions),
    vocab-parallel embedding and output layer, tied or untied."""
    return GPTModel(
        config=config,
        transformer_layer_spec=decoder_layer_spec(impl),
        vocab_size=padded_vocab_size(language.vocab_size, config.tensor_model_parallel_size),
        max_sequence_length=language.max_seq_len,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=language.tie_embeddings,
        position_embedding_type="rope" if language.position_embedding == "rope" else "learned_absolute",
        rotary_base=language.rope_theta,
        pg_collection=pg_collection,
    )
