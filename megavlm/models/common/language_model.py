"""Decoder-only language model: megatron-core's GPTModel with the spec from layer_specs."""
from __future__ import annotations

from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.transformer_config import TransformerConfig

from megavlm.config.model import LanguageConfig
from megavlm.models.common.layer_specs import block_spec, decoder_layer_spec
from megavlm.models.common.linears import ColumnLinear


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    """Vocab-parallel layers need a vocabulary divisible by TP; the padding rows are never
    looked up and their logits are excluded by the loss (losses/lm_loss.py)."""
    return -(-vocab_size // tp_size) * tp_size


class LanguageModel(GPTModel):
    """megatron-core's GPTModel with an output layer of the class the spec chose
    (``layer_specs.output_layer_cls``): GPTModel hard-codes a ColumnParallelLinear there. The
    replacement takes over the original's weight Parameter (same object, same attributes, same
    state-dict key), so nothing is allocated twice and tied embeddings stay tied."""

    def __init__(self, *args, output_layer_cls: type = ColumnLinear, embedding_scale: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.post_process and type(self.output_layer) is not output_layer_cls:
            self.output_layer = _rebuilt_output_layer(self, output_layer_cls)
        if embedding_scale is not None and self.pre_process:
            # GPTModel builds its embedding itself; re-classing it keeps its parameters (and the
            # tied-weight attributes GPTModel gave them) where they are
            self.embedding.__class__ = ScaledEmbedding
            self.embedding.scale = embedding_scale


class ScaledEmbedding(LanguageModelEmbedding):
    """Token embeddings times a constant (Gemma: sqrt(hidden_size)), before any image embedding
    takes its place in the sequence. ``scale`` is set by ``LanguageModel``."""

    scale: float = 1.0

    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs) * self.scale


def _rebuilt_output_layer(model: GPTModel, cls: type):
    old, config = model.output_layer, model.config
    new = cls(config.hidden_size, model.vocab_size, config=config, init_method=config.init_method, bias=False,
              skip_bias_add=False, gather_output=not model.parallel_output, skip_weight_param_allocation=True,
              embedding_activation_buffer=model.embedding_activation_buffer,
              grad_output_buffer=model.grad_output_buffer, tp_group=model.pg_collection.tp)
    if old.weight is not None:
        new.weight = old.weight
    return new


def build_language_model(language: LanguageConfig, config: TransformerConfig, impl: str, pg_collection=None,
                         pre_process: bool = True, post_process: bool = True, layer_spec=None,
                         output_layer_cls: type = ColumnLinear, prefix_lm: bool = False) -> GPTModel:
    """Llama-style (RMSNorm, SwiGLU, RoPE, GQA), Gemma-style (zero-centred RMSNorm, GeGLU, scaled
    embeddings, wide heads), Persimmon-style (LayerNorm, squared ReLU, partial RoPE, QK LayerNorm)
    or OPT-style (LayerNorm, ReLU, learned positions), vocab-parallel embedding and output layer,
    tied or untied. ``layer_spec`` replaces the decoder layer spec (Flamingo's fusion layers);
    ``prefix_lm``: the layers take the prefix-LM mask each batch brings. The embedding never
    scatters the sequence for sequence parallelism: image embeddings are placed into the whole
    sequence first, then the model scatters it once (models/common/vlm.py)."""
    pp_rank = pg_collection.pp.rank() if pg_collection is not None else None
    layer_spec = layer_spec or decoder_layer_spec(impl, qk_norm=language.qk_norm, prefix_lm=prefix_lm)
    return LanguageModel(
        config=config,
        embedding_scale=language.hidden_size ** 0.5 if language.scale_embeddings else None,
        transformer_layer_spec=block_spec(layer_spec, impl, config, pp_rank),
        vocab_size=padded_vocab_size(language.vocab_size, config.tensor_model_parallel_size),
        max_sequence_length=language.max_seq_len,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=language.tie_embeddings,
        position_embedding_type="rope" if language.position_embedding == "rope" else "learned_absolute",
        rotary_percent=language.rotary_percent,
        rotary_base=language.rope_theta,
        pg_collection=pg_collection,
        scatter_embedding_sequence_parallel=False,
        output_layer_cls=output_layer_cls,
    )


class DeferredLogitsLinear(ColumnLinear):
    """GPTModel's output layer that hands back the hidden states: the loss head applies the
    weight itself, chunk by chunk (fused linear cross-entropy). Parameters, state-dict keys and
    checkpoint sharding stay those of the ColumnParallelLinear it replaces."""

    def forward(self, input_, weight=None, runtime_gather_output=None):
        if self.sequence_parallel:  # the head needs every token; it all-reduces its input gradient itself
            input_ = gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=False,
                                                          group=self.tp_group)
        return input_, None


def output_weight(language_model: GPTModel):
    """The (vocab-sharded) weight that turns final hidden states into logits on the last stage."""
    if language_model.share_embeddings_and_output_weights:
        return language_model.shared_embedding_or_output_weight()
    return language_model.output_layer.weight
