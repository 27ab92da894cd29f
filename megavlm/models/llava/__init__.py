"""LLaVA family: CLIP ViT + MLP projector + Llama-style decoder. Named flavors below."""
from __future__ import annotations

from megavlm.config.model import ConnectorConfig, LanguageConfig, ModelConfig, VisionConfig

# CLIP ViT-L/14 at 336 px, features from the second-to-last layer, class token dropped.
CLIP_VIT_L_336 = dict(image_size=336, patch_size=14, hidden_size=1024, num_layers=24, num_heads=16,
                      ffn_hidden_size=4096, activation="quick_gelu", feature_layer=-2)


def _debug() -> ModelConfig:
    return ModelConfig(
        family="llava", flavor="debug",
        vision=VisionConfig(image_size=56, patch_size=14, hidden_size=64, num_layers=3, num_heads=4,
                            ffn_hidden_size=128, feature_layer=-2),
        language=LanguageConfig(vocab_size=771, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                ffn_hidden_size=176, max_seq_len=512),
        connector=ConnectorConfig(type="mlp2x_gelu"),
        image_token_id=3,
    )


def _llava_1b() -> ModelConfig:
    # CLIP ViT-L/14-336 + a TinyLlama-1.1B-shaped decoder.
    return ModelConfig(
        family="llava", flavor="llava-1b",
        vision=VisionConfig(**CLIP_VIT_L_336),
        language=LanguageConfig(vocab_size=32064, hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4,
                                ffn_hidden_size=5632, max_seq_len=4096, norm_eps=1e-5),
        connector=ConnectorConfig(type="mlp2x_gelu"),
        image_token_id=32000,
    )


def _llava_15_7b() -> ModelConfig:
    # CLIP ViT-L/14-336 + Vicuna-7B (llava-hf/llava-1.5-7b-hf shapes).
    return ModelConfig(
        family="llava", flavor="llava-1.5-7b",
        vision=VisionConfig(**CLIP_VIT_L_336),
        language=LanguageConfig(vocab_size=32064, hidden_size=4096, num_layers=32, num_heads=32,
                                ffn_hidden_size=11008, max_seq_len=4096, norm_eps=1e-5),
        connector=ConnectorConfig(type="mlp2x_gelu"),
        image_token_id=32000,
    )


def _llava_15_13b() -> ModelConfig:
    # CLIP ViT-L/14-336 + Vicuna-13B (llava-hf/llava-1.5-13b-hf shapes).
    return ModelConfig(
        family="llava", flavor="llava-1.5-13b",
        vision=VisionConfig(**CLIP_VIT_L_336),
        language=LanguageConfig(vocab_size=32064, hidden_size=5120, num_layers=40, num_heads=40,
                                ffn_hidden_size=13824, max_seq_len=4096, norm_eps=1e-5),
        connector=ConnectorConfig(type="mlp2x_gelu"),
        image_token_id=32000,
    )


FLAVORS = {"debug": _debug, "llava-1b": _llava_1b, "llava-1.5-7b": _llava_15_7b, "llava-1.5-13b": _llava_15_13b}
