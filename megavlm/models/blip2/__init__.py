"""BLIP-2 family: EVA-style ViT + Q-Former + OPT (or Llama-style) decoder. Named flavors below.

``head: lm`` builds the generative model (stage 2), ``head: qformer`` the stage-1 representation
model (the same ViT and Q-Former with the ITC/ITM/ITG heads, no LLM)."""
from __future__ import annotations

from megavlm.config.model import ConnectorConfig, LanguageConfig, ModelConfig, QFormerConfig, VisionConfig

# BLIP-2's ViT keeps the class token, has no pre-norm and ends with a LayerNorm.
_BLIP_VIT = dict(activation="gelu", norm_eps=1e-6, class_token=True, keep_class_token=True, pre_norm=False,
                 patch_bias=True, post_norm=True, feature_layer=-1)


def _opt(**shape) -> LanguageConfig:
    return LanguageConfig(normalization="LayerNorm", activation="relu", position_embedding="learned", qkv_bias=True,
                          linear_bias=True, tie_embeddings=True, **shape)


def _debug(language: LanguageConfig, flavor: str) -> ModelConfig:
    return ModelConfig(
        family="blip2", flavor=flavor, connector=ConnectorConfig(type="qformer"),
        vision=VisionConfig(image_size=56, patch_size=14, hidden_size=64, num_layers=2, num_heads=4,
                            ffn_hidden_size=128, **_BLIP_VIT),
        qformer=QFormerConfig(hidden_size=64, num_layers=2, num_heads=4, ffn_hidden_size=128, num_query_tokens=8,
                              cross_attention_freq=2, vocab_size=771, max_position_embeddings=64, embed_dim=32,
                              dec_token_id=7),
        language=language, image_token_id=3,
        # hidden 64: BERT's 0.02 at hidden 768 is ~0.07 here (the same relative scale); 0.02 leaves
        # the queries' cross-attention to the image too weak to learn from in a short run
        init_std=0.07,
    )


def _debug_opt() -> ModelConfig:
    return _debug(_opt(vocab_size=771, hidden_size=64, num_layers=2, num_heads=4, ffn_hidden_size=256,
                       max_seq_len=256), "debug")


def _debug_llama() -> ModelConfig:
    return _debug(LanguageConfig(vocab_size=771, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                 ffn_hidden_size=176, max_seq_len=256), "debug-llama")


def _blip2_opt_2_7b() -> ModelConfig:
    return ModelConfig(
        family="blip2", flavor="blip2-opt-2.7b", connector=ConnectorConfig(type="qformer"),
        vision=VisionConfig(image_size=224, patch_size=14, hidden_size=1408, num_layers=39, num_heads=16,
                            ffn_hidden_size=6144, **_BLIP_VIT),
        qformer=QFormerConfig(dec_token_id=30522),
        language=_opt(vocab_size=50304, hidden_size=2560, num_layers=32, num_heads=32, ffn_hidden_size=10240,
                      max_seq_len=2048),
        image_token_id=50265,
    )


FLAVORS = {"debug": _debug_opt, "debug-llama": _debug_llama, "blip2-opt-2.7b": _blip2_opt_2_7b}
