"""Fuyu family: no vision encoder. An image at its own resolution (up to a maximum) is cut into
patches in raster order, each linearly projected to the decoder's width, with an image-newline
token after each row of patches (data/patches.py); a Persimmon-style decoder (LayerNorm, squared
ReLU, partial RoPE, QK LayerNorm) reads them with the text. Everything trains in one stage."""
from __future__ import annotations

from megavlm.config.model import ConnectorConfig, LanguageConfig, ModelConfig, PatchInputConfig

UNIT_RANGE = [0.5, 0.5, 0.5]   # mean and std that map pixels to [-1, 1]


def _persimmon(**shape) -> LanguageConfig:
    return LanguageConfig(normalization="LayerNorm", activation="squared_relu", linear_bias=True, qkv_bias=True,
                          qk_norm=True, rotary_percent=0.5, rope_theta=25000.0, norm_eps=1e-5, **shape)


def _debug() -> ModelConfig:
    # 16-pixel patches, images scaled to fit 96 x 80: the embedded 112 px scenes become 5 x 5
    # patches (30 positions with the newlines). Ids 768-770 are the debug vocabulary's rows past
    # the embedded tokenizer's 768 pieces: 769 is the image newline.
    return ModelConfig(
        family="fuyu", flavor="debug", vision=None,
        patches=PatchInputConfig(patch_size=16, max_height=80, max_width=96, newline_token_id=769),
        language=_persimmon(vocab_size=771, hidden_size=72, num_layers=2, num_heads=6, ffn_hidden_size=160,
                            max_seq_len=512),
        connector=ConnectorConfig(type="linear"),
        image_token_id=3, image_mean=list(UNIT_RANGE), image_std=list(UNIT_RANGE),
    )


def _fuyu_8b() -> ModelConfig:
    # adept/fuyu-8b: 30-pixel patches, images up to 1080 x 1920, |SPEAKER| (71011) marks a patch
    # and |NEWLINE| (71019) ends a row.
    return ModelConfig(
        family="fuyu", flavor="fuyu-8b", vision=None,
        patches=PatchInputConfig(patch_size=30, max_height=1080, max_width=1920, newline_token_id=71019),
        language=_persimmon(vocab_size=262144, hidden_size=4096, num_layers=36, num_heads=64, ffn_hidden_size=16384,
                            max_seq_len=16384),
        connector=ConnectorConfig(type="linear"),
        image_token_id=71011, image_mean=list(UNIT_RANGE), image_std=list(UNIT_RANGE),
    )


FLAVORS = {"debug": _debug, "fuyu-8b": _fuyu_8b}
