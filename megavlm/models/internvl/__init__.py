"""InternVL family: InternViT (QK-norm, LayerScale) + pixel-shuffle MLP connector + Qwen2-style
decoder, trained with dynamic-resolution tiles. Named flavors below."""
from __future__ import annotations

from megavlm.config.model import ConnectorConfig, LanguageConfig, ModelConfig, VisionConfig

# InternViT-300M-448px (InternVL 2.5 / 3): no ln_pre, features from the last layer, class token dropped.
INTERNVIT_300M = dict(image_size=448, patch_size=14, hidden_size=1024, num_layers=24, num_heads=16,
                      ffn_hidden_size=4096, activation="gelu", norm_eps=1e-6, pre_norm=False, patch_bias=True,
                      feature_layer=-1, layer_scale=0.1, qk_norm=False)


def _debug() -> ModelConfig:
    # 56 px tiles of 7 px patches: an 8x8 grid, 16 LLM tokens per tile after the pixel shuffle.
    return ModelConfig(
        family="internvl", flavor="debug",
        vision=VisionConfig(image_size=56, patch_size=7, hidden_size=64, num_layers=2, num_heads=4, ffn_hidden_size=128,
                            activation="gelu", norm_eps=1e-6, pre_norm=False, patch_bias=True, feature_layer=-1,
                            layer_scale=0.1, qk_norm=True),
        language=LanguageConfig(vocab_size=771, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                ffn_hidden_size=176, max_seq_len=1024, rope_theta=1e6, norm_eps=1e-6, qkv_bias=True,
                                tie_embeddings=True),
        connector=ConnectorConfig(type="pixel_shuffle_mlp"),
        image_token_id=3,
    )


def _internvl3_1b() -> ModelConfig:
    # OpenGVLab/InternVL3-1B-hf shapes: InternViT-300M + Qwen2.5-0.5B.
    return ModelConfig(
        family="internvl", flavor="internvl3-1b",
        vision=VisionConfig(**INTERNVIT_300M),
        language=LanguageConfig(vocab_size=151674, hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
                                ffn_hidden_size=4864, max_seq_len=32768, rope_theta=1e6, norm_eps=1e-6, qkv_bias=True,
                                tie_embeddings=True),
        connector=ConnectorConfig(type="pixel_shuffle_mlp"),
        image_token_id=151667,
    )


def _internvl3_8b() -> ModelConfig:
    # OpenGVLab/InternVL3-8B-hf shapes: InternViT-300M + Qwen2.5-7B.
    return ModelConfig(
        family="internvl", flavor="internvl3-8b",
        vision=VisionConfig(**INTERNVIT_300M),
        language=LanguageConfig(vocab_size=151674, hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4,
                                ffn_hidden_size=18944, max_seq_len=32768, rope_theta=1e6, norm_eps=1e-6, qkv_bias=True),
        connector=ConnectorConfig(type="pixel_shuffle_mlp"),
        image_token_id=151667,
    )


FLAVORS = {"debug": _debug, "internvl3-1b": _internvl3_1b, "internvl3-8b": _internvl3_8b}
