"""Base of every family's top-level model: what megatron-core's schedules and DDP ask of a model."""
from __future__ import annotations

from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule


class VLMBase(MegatronModule):
    """Holds ``language_model`` (a GPTModel chunk); exposes what the schedules and
    ``finalize_model_grads`` look up on the model they are given."""

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
