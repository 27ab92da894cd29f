"""HF <-> megavlm name mapping for the building blocks several families share.

Each function maps one block between an HF state dict (``hf``, with a prefix) and megavlm's full
state dict (``out``, with a prefix), in both directions, so a family adapter is a list of calls.
"""
from __future__ import annotations

import torch

from megavlm.config.model import LanguageConfig, VisionConfig
from megavlm.models.common.sharding import fuse_qkv, split_qkv


def _take(hf: dict, key: str) -> torch.Tensor:
    try:
        return hf[key]
    except KeyError:
        raise KeyError(f"HF checkpoint has no tensor {key!r}") from None


# ---- CLIP vision tower --------------------------------------------------------------------------
def clip_vision_to_megavlm(hf: dict, src: str, out: dict, dst: str, vision: VisionConfig) -> None:
    """src like 'model.vision_tower.'; dst like 'vision.'. Only the layers megavlm builds are taken."""
    out[dst + "patch_embed.weight"] = _take(hf, src + "embeddings.patch_embedding.weight")
    if vision.patch_bias:
        out[dst + "patch_embed.bias"] = _take(hf, src + "embeddings.patch_embedding.bias")
    if vision.class_token:
        out[dst + "class_token"] = _take(hf, src + "embeddings.class_embedding")
    out[dst + "position_embeddings"] = _take(hf, src + "embeddings.position_embedding.weight")
    if vision.pre_norm:
        for p in ("weight", "bias"):
            out[dst + f"ln_pre.{p}"] = _take(hf, src + f"pre_layrnorm.{p}")
    heads = vision.num_heads
    for i in range(vision.layers_to_build):
        h, m = f"{src}encoder.layers.{i}.", f"{dst}encoder.layers.{i}."
        for p in ("weight", "bias"):
            out[m + f"input_layernorm.{p}"] = _take(hf, h + f"layer_norm1.{p}")
            out[m + f"self_attention.linear_qkv.{p}"] = fuse_qkv(
                *(_take(hf, h + f"self_attn.{x}_proj.{p}") for x in "qkv"), heads, heads)
            out[m + f"self_attention.linear_proj.{p}"] = _take(hf, h + f"self_attn.out_proj.{p}")
            out[m + f"pre_mlp_layernorm.{p}"] = _take(hf, h + f"layer_norm2.{p}")
            out[m + f"mlp.linear_fc1.{p}"] = _take(hf, h + f"mlp.fc1.{p}")
            out[m + f"mlp.linear_fc2.{p}"] = _take(hf, h + f"mlp.fc2.{p}")


def clip_vision_to_hf(full: dict, src: str, hf: dict, dst: str, vision: VisionConfig) -> None:
    hf[dst + "embeddings.patch_embedding.weight"] = full[src + "patch_embed.weight"]
    if vision.patch_bias:
        hf[dst + "embeddings.patch_embedding.bias"] = full[src + "patch_embed.bias"]
    if vision.class_token:
        hf[dst + "embeddings.class_embedding"] = full[src + "class_token"]
    hf[dst + "embeddings.position_embedding.weight"] = full[src + "position_embeddings"]
    if vision.pre_norm:
        for p in ("weight", "bias"):
            hf[dst + f"pre_layrnorm.{p}"] = full[src + f"ln_pre.{p}"]
    heads = vision.num_heads
    for i in range(vision.layers_to_build):
        m, h = f"{src}encoder.layers.{i}.", f"{dst}encoder.layers.{i}."
        for p in ("weight", "bias"):
            hf[h + f"layer_norm1.{p}"] = full[m + f"input_layernorm.{p}"]
            q, k, v = split_qkv(full[m + f"self_attention.linear_qkv.{p}"], heads, heads)
            hf[h + f"self_attn.q_proj.{p}"], hf[h + f"self_attn.k_proj.{p}"], hf[h + f"self_attn.v_proj.{p}"] = q, k, v
            hf[h + f"self_attn.out_proj.{p}"] = full[m + f"self_attention.linear_proj.{p}"]
            hf[h + f"layer_norm2.{p}"] = full[m + f"pre_mlp_layernorm.{p}"]
            hf[h + f"mlp.fc1.{p}"] = full[m + f"mlp.linear_fc1.{p}"]
            hf[h + f"mlp.fc2.{p}"] = full[m + f"mlp.linear_fc2.{p}"]


# ---- Llama-style decoder -----------------------------------------------------------------------
def llama_to_megavlm(hf: dict, src: str, head: str, out: dict, dst: str, lang: LanguageConfig) -> None:
    """src like 'model.language_model.'; head: the lm_head key; dst like 'language_model.'."""
    out[dst + "embedding.word_embeddings.weight"] = _take(hf, src + "embed_tokens.weight")
    for i in range(lang.num_layers):
        h, m = f"{src}layers.{i}.", f"{dst}decoder.layers.{i}."
        out[m + "input_layernorm.weight"] = _take(hf, h + "input_layernorm.weight")
        params = ("weight", "bias") if lang.qkv_bias else ("weight",)
        for p in params:
            out[m + f"self_attention.linear_qkv.{p}"] = fuse_qkv(
                *(_take(hf, h + f"self_attn.{x}_proj.{p}") for x in "qkv"), lang.num_heads, lang.query_groups)
        out[m + "self_attention.linear_proj.weight"] = _take(hf, h + "self_attn.o_proj.weight")
        out[m + "pre_mlp_layernorm.weight"] = _take(hf, h + "post_attention_layernorm.weight")
        out[m + "mlp.linear_fc1.weight"] = torch.cat([_take(hf, h + "mlp.gate_proj.weight"),
                                                      _take(hf, h + "mlp.up_proj.weight")])
        out[m + "mlp.linear_fc2.weight"] = _take(hf, h + "mlp.down_proj.weight")
    out[dst + "decoder.final_layernorm.weight"] = _take(hf, src + "norm.weight")
    if not lang.tie_embeddings:
        out[dst + "output_layer.weight"] = _take(hf, head)


def llama_to_hf(full: dict, src: str, hf: dict, dst: str, head: str, lang: LanguageConfig) -> None:
    hf[dst + "embed_tokens.weight"] = full[src + "embedding.word_embeddings.weight"]
    for i in range(lang.num_layers):
        m, h = f"{src}decoder.layers.{i}.", f"{dst}layers.{i}."
        hf[h + "input_layernorm.weight"] = full[m + "input_layernorm.weight"]
        params = ("weight", "bias") if lang.qkv_bias else ("weight",)
        for p in params:
            q, k, v = split_qkv(full[m + f"self_attention.linear_qkv.{p}"], lang.num_heads, lang.query_groups)
            hf[h + f"self_attn.q_proj.{p}"], hf[h + f"self_attn.k_proj.{p}"], hf[h + f"self_attn.v_proj.{p}"] = q, k, v
        hf[h + "self_attn.o_proj.weight"] = full[m + "self_attention.linear_proj.weight"]
        hf[h + "post_attention_layernorm.weight"] = full[m + "pre_mlp_layernorm.weight"]
        gate, up = full[m + "mlp.linear_fc1.weight"].chunk(2, 0)
        hf[h + "mlp.gate_proj.weight"], hf[h + "mlp.up_proj.weight"] = gate, up
        hf[h + "mlp.down_proj.weight"] = full[m + "mlp.linear_fc2.weight"]
    hf[dst + "norm.weight"] = full[src + "decoder.final_layernorm.weight"]
    if not lang.tie_embeddings:  # HF checkpoints of tied models carry no lm_head tensor
        hf[head] = full[src + "output_layer.weight"]


def llama_config_from_hf(text: dict) -> LanguageConfig:
    if text.get("hidden_act", "silu") != "silu":
        raise ValueError(f"Llama-style decoder expects hidden_act 'silu', got {text['hidden_act']!r}")
    heads = text["num_attention_heads"]
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    if head_dim * heads != text["hidden_size"]:
        raise ValueError(f"head_dim {head_dim} x {heads} heads != hidden_size {text['hidden_size']}: unsupported")
    rope = text.get("rope_parameters") or {}
    return LanguageConfig(
        vocab_size=text["vocab_size"], hidden_size=text["hidden_size"], num_layers=text["num_hidden_layers"],
        num_heads=heads, num_kv_heads=text.get("num_key_value_heads") or heads,
        ffn_hidden_size=text["intermediate_size"], max_seq_len=text.get("max_position_embeddings", 4096),
        rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 10000.0))),
        norm_eps=text.get("rms_norm_eps", 1e-6), qkv_bias=bool(text.get("attention_bias", False)),
        tie_embeddings=bool(text.get("tie_word_embeddings", False)),
    )


def llama_config_to_hf(lang: LanguageConfig) -> dict:
    return {
        "model_type": "llama", "vocab_size": lang.vocab_size, "hidden_size": lang.hidden_size,
        "num_hidden_layers": lang.num_layers, "num_attention_heads": lang.num_heads,
        "num_key_value_heads": lang.query_groups, "intermediate_size": lang.ffn_hidden_size,
        "max_position_embeddings": lang.max_seq_len, "rope_theta": lang.rope_theta,
        "rope_parameters": {"rope_theta": lang.rope_theta, "rope_type": "default"},
        "rms_norm_eps": lang.norm_eps, "attention_bias": lang.qkv_bias, "mlp_bias": False,
        "tie_word_embeddings": lang.tie_embeddings, "hidden_act": "silu",
    }


def clip_config_from_hf(vis: dict, feature_layer: int, keep_class_token: bool) -> VisionConfig:
    return VisionConfig(
        image_size=vis["image_size"], patch_size=vis["patch_size"], hidden_size=vis["hidden_size"],
        num_layers=vis["num_hidden_layers"], num_heads=vis["num_attention_heads"],
        ffn_hidden_size=vis["intermediate_size"], activation=vis.get("hidden_act", "quick_gelu"),
        norm_eps=vis.get("layer_norm_eps", 1e-5), feature_layer=feature_layer, keep_class_token=keep_class_token,
    )


def clip_config_to_hf(vision: VisionConfig) -> dict:
    return {
        "model_type": "clip_vision_model", "image_size": vision.image_size, "patch_size": vision.patch_size,
        "hidden_size": vision.hidden_size, "num_hidden_layers": vision.num_layers,
        "num_attention_heads": vision.num_heads, "intermediate_size": vision.ffn_hidden_size,
        "hidden_act": vision.activation, "layer_norm_eps": vision.norm_eps,
    }
