"""PaliGemma family: a SigLIP vision tower (the ViT with SigLIP's options: no class token, no
pre-norm, tanh GELU, a final LayerNorm) -> a linear projector -> a Gemma decoder (GeGLU,
zero-centred RMSNorm, embeddings scaled by sqrt(hidden), wide heads, tied head) with prefix-LM
attention: bidirectional over the image and the prompt, causal over the answer."""
from __future__ import annotations

from megavlm.config.model import ConnectorConfig, LanguageConfig, ModelConfig, VisionConfig

UNIT_RANGE = [0.5, 0.5, 0.5]   # SigLIP's mean and std: pixels to [-1, 1]


def siglip(**shape) -> VisionConfig:
    """A SigLIP vision tower read at its last layer through its final LayerNorm."""
    return VisionConfig(activation="gelu_tanh", norm_eps=1e-6, class_token=False, pre_norm=False, patch_bias=True,
                        feature_layer=-1, post_norm=True, **shape)


def gemma(**shape) -> LanguageConfig:
    return LanguageConfig(activation="geglu", scale_embeddings=True, zero_centered_norm=True, tie_embeddings=True,
                          norm_eps=1e-6, rope_theta=10000.0, **shape)


def _debug() -> ModelConfig:
    # Heads of 24 channels in a 64-wide decoder (Gemma's head_dim is not hidden / heads), GQA.
    return ModelConfig(
        family="paligemma", flavor="debug",
        vision=siglip(image_size=56, patch_size=14, hidden_size=64, num_layers=2, num_heads=4, ffn_hidden_size=128),
        language=gemma(vocab_size=771, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, kv_channels=24,
                       ffn_hidden_size=176, max_seq_len=512),
        connector=ConnectorConfig(type="linear"),
        image_token_id=3, prefix_lm=True, image_mean=list(UNIT_RANGE), image_std=list(UNIT_RANGE),
    )


def _paligemma_3b_224() -> ModelConfig:
    # google/paligemma-3b-pt-224: SigLIP So400m/14 at 224 px (256 image tokens) + Gemma-2B (one
    # KV head of 256 channels: tensor parallelism 1, data parallel across GPUs).
    return ModelConfig(
        family="paligemma", flavor="paligemma-3b-224",
        vision=siglip(image_size=224, patch_size=14, hidden_size=1152, num_layers=27, num_heads=16,
                      ffn_hidden_size=4304),
        language=gemma(vocab_size=257216, hidden_size=2048, num_layers=18, num_heads=8, num_kv_heads=1,
                       ffn_hidden_size=16384, max_seq_len=8192),
        connector=ConnectorConfig(type="linear"),
        image_token_id=257152, prefix_lm=True, image_mean=list(UNIT_RANGE), image_std=list(UNIT_RANGE),
    )


FLAVORS = {"debug": _debug, "paligemma-3b-224": _paligemma_3b_224}
