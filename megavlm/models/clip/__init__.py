"""CLIP family: contrastive image-text pre-training, CLIP (causal text encoder, class-token and
end-of-text pooling, InfoNCE) or SigLIP (bidirectional text encoder, attention pooling, pairwise
sigmoid loss). ``language`` is the text encoder. Named flavors below.

The ``debug`` ViT is LLaVA's ``debug`` ViT with every layer and a final norm, so the vision
tower a debug CLIP stage trains loads into a debug LLaVA (``stage.init_components_from``)."""
from __future__ import annotations

import math

from megavlm.config.model import ContrastiveConfig, LanguageConfig, ModelConfig, VisionConfig

# The ViT of a contrastive model runs every layer and ends with a norm on its class token
# (CLIP's post_layernorm) or on every token (SigLIP's, before the attention pooling).
_CLIP_VIT = dict(feature_layer=-1, keep_class_token=True, post_norm=True)
_SIGLIP_VIT = dict(activation="gelu_tanh", norm_eps=1e-6, class_token=False, pre_norm=False, patch_bias=True,
                   feature_layer=-1, post_norm=True)


def _clip_text(**shape) -> LanguageConfig:
    return LanguageConfig(normalization="LayerNorm", activation="quick_gelu", position_embedding="learned",
                          qkv_bias=True, linear_bias=True, **shape)


def _siglip_text(**shape) -> LanguageConfig:
    return LanguageConfig(normalization="LayerNorm", activation="gelu_tanh", position_embedding="learned",
                          qkv_bias=True, linear_bias=True, norm_eps=1e-6, **shape)


def _siglip_contrastive(embed_dim: int, eot_token_id: int) -> ContrastiveConfig:
    return ContrastiveConfig(loss="siglip", embed_dim=embed_dim, image_pooling="attention", text_pooling="last",
                             causal_text=False, image_projection=False, text_projection_bias=True,
                             logit_scale_init=math.log(10.0), logit_bias_init=-10.0, max_logit_scale=None,
                             eot_token_id=eot_token_id)


def _debug() -> ModelConfig:
    return ModelConfig(
        family="clip", flavor="debug", head="contrastive",
        vision=VisionConfig(image_size=56, patch_size=14, hidden_size=64, num_layers=3, num_heads=4,
                            ffn_hidden_size=128, **_CLIP_VIT),
        language=_clip_text(vocab_size=771, hidden_size=64, num_layers=2, num_heads=4, ffn_hidden_size=128,
                            max_seq_len=32),
        contrastive=ContrastiveConfig(embed_dim=48, eot_token_id=2),
        image_token_id=3,
        # hidden 64: 0.02 (right at widths of ~768) is ~0.07 here; at 0.02 the towers start too
        # weak and training stalls on the background colour
        init_std=0.07,
    )


def _debug_siglip() -> ModelConfig:
    return ModelConfig(
        family="clip", flavor="debug-siglip", head="contrastive",
        vision=VisionConfig(image_size=56, patch_size=14, hidden_size=64, num_layers=2, num_heads=4,
                            ffn_hidden_size=128, **_SIGLIP_VIT),
        language=_siglip_text(vocab_size=771, hidden_size=64, num_layers=2, num_heads=4, ffn_hidden_size=128,
                              max_seq_len=32),
        contrastive=_siglip_contrastive(64, eot_token_id=2),
        image_token_id=3,
        init_std=0.07,
    )


def _clip_vit_l_14_336() -> ModelConfig:
    # openai/clip-vit-large-patch14-336
    return ModelConfig(
        family="clip", flavor="clip-vit-l-14-336", head="contrastive",
        vision=VisionConfig(image_size=336, patch_size=14, hidden_size=1024, num_layers=24, num_heads=16,
                            ffn_hidden_size=4096, activation="quick_gelu", **_CLIP_VIT),
        language=_clip_text(vocab_size=49408, hidden_size=768, num_layers=12, num_heads=12, ffn_hidden_size=3072,
                            max_seq_len=77),
        contrastive=ContrastiveConfig(embed_dim=768, eot_token_id=49407),
        image_token_id=0,
    )


def _siglip_so400m_384() -> ModelConfig:
    # google/siglip-so400m-patch14-384 (384 px read as 27 x 27 patches of 14)
    return ModelConfig(
        family="clip", flavor="siglip-so400m-384", head="contrastive",
        vision=VisionConfig(image_size=384, patch_size=14, hidden_size=1152, num_layers=27, num_heads=16,
                            ffn_hidden_size=4304, **_SIGLIP_VIT),
        language=_siglip_text(vocab_size=32000, hidden_size=1152, num_layers=27, num_heads=16, ffn_hidden_size=4304,
                              max_seq_len=64),
        contrastive=_siglip_contrastive(1152, eot_token_id=1),
        image_token_id=0,
    )


FLAVORS = {"debug": _debug, "debug-siglip": _debug_siglip, "clip-vit-l-14-336": _clip_vit_l_14_336,
           "siglip-so400m-384": _siglip_so400m_384}
