"""Flamingo family (IDEFICS layout): CLIP-style ViT + Perceiver resampler + gated cross-attention
blocks inside a frozen Llama-style decoder. Named flavors below; model.py, resampler.py,
fusion.py and state_dict_adapter.py (HF ``IdeficsForVisionText2Text``) sit beside this file."""
from __future__ import annotations

from megavlm.config.model import ConnectorConfig, FlamingoConfig, LanguageConfig, ModelConfig, VisionConfig

# IDEFICS reads the ViT's last hidden state, class token included, without a final norm.
_FEATURES = dict(activation="gelu", feature_layer=-1, keep_class_token=True)


def _debug() -> ModelConfig:
    return ModelConfig(
        family="flamingo", flavor="debug", connector=ConnectorConfig(type="perceiver"),
        vision=VisionConfig(image_size=56, patch_size=14, hidden_size=64, num_layers=2, num_heads=4,
                            ffn_hidden_size=128, **_FEATURES),
        language=LanguageConfig(vocab_size=771, hidden_size=64, num_layers=2, num_heads=4, ffn_hidden_size=176,
                                max_seq_len=512, norm_eps=1e-6),
        flamingo=FlamingoConfig(num_latents=8, resampler_depth=2, resampler_heads=4, resampler_head_dim=16,
                                cross_attention_interval=1, max_media=6),
        image_token_id=3,
    )


def _idefics_9b() -> ModelConfig:
    # HuggingFaceM4/idefics-9b: CLIP ViT-H/14 at 224 px + LLaMA-7B, a block before every 4th layer.
    return ModelConfig(
        family="flamingo", flavor="idefics-9b", connector=ConnectorConfig(type="perceiver"),
        vision=VisionConfig(image_size=224, patch_size=14, hidden_size=1280, num_layers=32, num_heads=16,
                            ffn_hidden_size=5120, **_FEATURES),
        language=LanguageConfig(vocab_size=32002, hidden_size=4096, num_layers=32, num_heads=32, ffn_hidden_size=11008,
                                max_seq_len=2048, norm_eps=1e-6),
        flamingo=FlamingoConfig(num_latents=64, resampler_depth=6, resampler_heads=16, resampler_head_dim=96,
                                cross_attention_interval=4, max_media=5, hf_additional_vocab=2),
        image_token_id=32001,
    )


FLAVORS = {"debug": _debug, "idefics-9b": _idefics_9b}
