"""Decoder-only language model: megatron-core's GPTModel with the spec from layer_specs."""
from __future__ import annotations

from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.transformer_config import TransformerConfig

from megavlm.config.model import LanguageConfig
from megavlm.models.common.layer_specs import decoder_layer_spec


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    """Vocab-parallel layers need a vocabulary divisible by TP; the padding rows are never
    looked up and their logits are excluded by the loss (losses/lm_loss.py)."""
    return -(-vocab_size // tp_size) * tp_size


def build_language_model(language: LanguageConfig, config: TransformerConfig, impl: str, pg_collection=None,
                         pre_process: bool = True, post_process: bool = True, layer_spec=None) -> GPTModel:
    """Llama-style (RMSNorm, SwiGLU, RoPE, GQA) or OPT-style (LayerNorm, ReLU, learned positions),
    vocab-parallel embedding and output layer, tied or untied. ``layer_spec`` replaces the
    decoder layer spec (Flamingo's fusion layers)."""
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec or decoder_layer_spec(impl),
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


class DeferredLogitsLinear(ColumnParallelLinear):
    """GPTModel's output layer that hands back the hidden states: the loss head applies the
    weight itself, chunk by chunk (fused linear cross-entropy). Parameters, state-dict keys and
    checkpoint sharding stay those of the ColumnParallelLinear it replaces."""

    def forward(self, input_, weight=None, runtime_gather_output=None):
        return input_, None


def defer_logits(language_model: GPTModel) -> GPTModel:
    if language_model.post_process:
        if language_model.config.sequence_parallel:
            raise ValueError("kernels.fused_linear_cross_entropy does not support sequence parallelism yet")
        language_model.output_layer.__class__ = DeferredLogitsLinear
    return language_model


def output_weight(language_model: GPTModel):
    """The (vocab-sharded) weight that turns final hidden states into logits on the last stage."""
    if language_model.share_embeddings_and_output_weights:
        return language_model.shared_embedding_or_output_weight()
    return language_model.output_layer.weight
