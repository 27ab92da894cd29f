"""HF <-> megavlm name mapping for the building blocks several families share.

Each function maps one block between an HF state dict (``hf``, with a prefix) and megavlm's full
state dict (``out``, with a prefix), in both directions, so a family adapter is a list of calls.
"""
from __future__ import annotations

import torch

from megavlm.config.model import LanguageConfig, VisionConfig
from megavlm.models.common.sharding import (fuse_padded_kv, fuse_padded_qkv, fuse_qkv, pad_heads, split_padded_kv,
                                            split_padded_qkv, split_qkv, strip_heads)


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
    clip_layers_to_megavlm(hf, src + "encoder.layers.", out, dst + "encoder.layers.", vision.layers_to_build,
                           vision.num_heads, vision.built_heads)


def clip_layers_to_megavlm(hf: dict, src: str, out: dict, dst: str, layers: int, heads: int, padded: int) -> None:
    """CLIP-named encoder layers (CLIP's and SigLIP's ViT and text encoders) -> megatron-core
    layers; src like 'text_model.encoder.layers.', dst like 'text.encoder.layers.'."""
    for i in range(layers):
        h, m = f"{src}{i}.", f"{dst}{i}."
        for p in ("weight", "bias"):
            out[m + f"input_layernorm.{p}"] = _take(hf, h + f"layer_norm1.{p}")
            out[m + f"self_attention.linear_qkv.{p}"] = fuse_padded_qkv(
                *(_take(hf, h + f"self_attn.{x}_proj.{p}") for x in "qkv"), heads, padded)
            out[m + f"self_attention.linear_proj.{p}"] = _take(hf, h + f"self_attn.out_proj.{p}")
            out[m + f"pre_mlp_layernorm.{p}"] = _take(hf, h + f"layer_norm2.{p}")
            out[m + f"mlp.linear_fc1.{p}"] = _take(hf, h + f"mlp.fc1.{p}")
            out[m + f"mlp.linear_fc2.{p}"] = _take(hf, h + f"mlp.fc2.{p}")
        pad_projection(out, m + "self_attention.linear_proj.weight", heads, padded)


def stand_alone_clip_tower(hf: dict, out: dict, dst: str, vision: VisionConfig) -> bool:
    """The vision tower of an HF CLIP or SigLIP checkpoint (``CLIPModel``, ``CLIPVisionModel``,
    ``SiglipModel``, ``SiglipVisionModel``: tensors under ``vision_model.``) into ``out``; False
    when ``hf`` is not one. Its post-layernorm becomes the ViT's final norm when the config has one."""
    prefix = "vision_model."
    if prefix + "embeddings.patch_embedding.weight" not in hf:
        return False
    if vision.qk_norm or vision.layer_scale is not None or not vision.qkv_bias:
        raise ValueError("a CLIP/SigLIP vision tower has no QK-norm or LayerScale and has q/k/v biases: set "
                         "model.vision.qk_norm: false, layer_scale: null, qkv_bias: true")
    siglip_vision_to_megavlm(hf, prefix, out, dst, vision)
    return True


def pad_projection(state: dict, key: str, heads: int, padded: int) -> None:
    """Zero input columns of an attention's output projection for the dummy heads: whatever a
    dummy head computes, it adds nothing (and its weights get zero gradients)."""
    state[key] = pad_heads(state[key], heads, padded, dim=1)


def strip_projection(state: dict, key: str, heads: int, padded: int) -> None:
    state[key] = strip_heads(state[key], heads, padded, dim=1)


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
    clip_layers_to_hf(full, src + "encoder.layers.", hf, dst + "encoder.layers.", vision.layers_to_build,
                      vision.num_heads, vision.built_heads)


def clip_layers_to_hf(full: dict, src: str, hf: dict, dst: str, layers: int, heads: int, padded: int) -> None:
    """Inverse of clip_layers_to_megavlm (dummy heads stripped)."""
    for i in range(layers):
        m, h = f"{src}{i}.", f"{dst}{i}."
        for p in ("weight", "bias"):
            hf[h + f"layer_norm1.{p}"] = full[m + f"input_layernorm.{p}"]
            q, k, v = split_padded_qkv(full[m + f"self_attention.linear_qkv.{p}"], heads, padded)
            hf[h + f"self_attn.q_proj.{p}"], hf[h + f"self_attn.k_proj.{p}"], hf[h + f"self_attn.v_proj.{p}"] = q, k, v
            hf[h + f"self_attn.out_proj.{p}"] = full[m + f"self_attention.linear_proj.{p}"]
            hf[h + f"layer_norm2.{p}"] = full[m + f"pre_mlp_layernorm.{p}"]
            hf[h + f"mlp.fc1.{p}"] = full[m + f"mlp.linear_fc1.{p}"]
            hf[h + f"mlp.fc2.{p}"] = full[m + f"mlp.linear_fc2.{p}"]
        strip_projection(hf, h + "self_attn.out_proj.weight", heads, padded)


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


def check_supported(section: str, cfg: dict, supported: dict[str, tuple]) -> None:
    """Reject an HF config field whose value megavlm does not reproduce, naming it. ``supported``:
    field -> the values megavlm computes the same as HF (an absent field has HF's default)."""
    for key, values in supported.items():
        if key in cfg and cfg[key] not in values:
            raise ValueError(f"HF config field {section}.{key}={cfg[key]!r} is not supported "
                             f"(supported: {', '.join(map(repr, values))})")


# Decoders with the Llama layout. Qwen2 is Llama with biases on q/k/v only (always present);
# Llama's attention_bias also puts one on o_proj, which megatron-core ties to the MLP biases.
LLAMA_LIKE = ("llama", "qwen2", "idefics")
_DECODER_FIELDS = {"hidden_act": ("silu",), "attention_bias": (False,), "mlp_bias": (False,), "pretraining_tp": (1,),
                   "rope_scaling": (None,), "use_sliding_window": (False,), "attention_dropout": (0, 0.0)}


def llama_config_from_hf(text: dict, section: str = "text_config") -> LanguageConfig:
    model_type = text.get("model_type", "llama")
    check_supported(section, text, {"model_type": LLAMA_LIKE, **_DECODER_FIELDS})
    rope = text.get("rope_parameters") or {}
    check_supported(f"{section}.rope_parameters", rope, {"rope_type": ("default",)})
    heads = text["num_attention_heads"]
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    if head_dim * heads != text["hidden_size"]:
        raise ValueError(f"HF config field {section}.head_dim={head_dim}: {heads} heads of it != hidden_size "
                         f"{text['hidden_size']} is not supported")
    return LanguageConfig(
        vocab_size=text["vocab_size"], hidden_size=text["hidden_size"], num_layers=text["num_hidden_layers"],
        num_heads=heads, num_kv_heads=text.get("num_key_value_heads") or heads,
        ffn_hidden_size=text["intermediate_size"], max_seq_len=text.get("max_position_embeddings", 4096),
        rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 10000.0))),
        norm_eps=text.get("rms_norm_eps", 1e-6), qkv_bias=model_type == "qwen2",
        tie_embeddings=bool(text.get("tie_word_embeddings", False)),
    )


def llama_config_to_hf(lang: LanguageConfig) -> dict:
    """A Llama config, or Qwen2's for a decoder with q/k/v biases."""
    if lang.linear_bias or lang.normalization != "RMSNorm" or lang.activation != "swiglu" \
            or lang.position_embedding != "rope":
        raise ValueError("HF Llama/Qwen2 decoders have RMSNorm, SwiGLU, RoPE and no biases outside q/k/v")
    config = {
        "model_type": "llama", "vocab_size": lang.vocab_size, "hidden_size": lang.hidden_size,
        "num_hidden_layers": lang.num_layers, "num_attention_heads": lang.num_heads,
        "num_key_value_heads": lang.query_groups, "intermediate_size": lang.ffn_hidden_size,
        "max_position_embeddings": lang.max_seq_len, "rope_theta": lang.rope_theta,
        "rope_parameters": {"rope_theta": lang.rope_theta, "rope_type": "default"},
        "rms_norm_eps": lang.norm_eps, "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": lang.tie_embeddings, "hidden_act": "silu",
    }
    if lang.qkv_bias:
        for key in ("attention_bias", "mlp_bias"):
            config.pop(key)
        config.update(model_type="qwen2", use_sliding_window=False, max_window_layers=lang.num_layers,
                      layer_types=["full_attention"] * lang.num_layers)
    return config


# megavlm activation name <-> HF hidden_act
HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}
ACTIVATIONS_FROM_HF = {theirs: ours for ours, theirs in HF_ACTIVATIONS.items()}


def activation_from_hf(section: str, cfg: dict, default: str) -> str:
    check_supported(section, cfg, {"hidden_act": tuple(ACTIVATIONS_FROM_HF)})
    return ACTIVATIONS_FROM_HF[cfg.get("hidden_act", default)]


def clip_config_from_hf(vis: dict, feature_layer: int, keep_class_token: bool) -> VisionConfig:
    """A CLIP vision config, or a SigLIP one (no class token, no pre-norm, a patch bias)."""
    siglip = vis.get("model_type") == "siglip_vision_model"
    check_supported("vision_config", vis, {"num_channels": (3,), "attention_dropout": (0, 0.0)})
    return VisionConfig(
        image_size=vis["image_size"], patch_size=vis["patch_size"], hidden_size=vis["hidden_size"],
        num_layers=vis["num_hidden_layers"], num_heads=vis["num_attention_heads"],
        ffn_hidden_size=vis["intermediate_size"],
        activation=activation_from_hf("vision_config", vis, "gelu_pytorch_tanh" if siglip else "quick_gelu"),
        norm_eps=vis.get("layer_norm_eps", 1e-6 if siglip else 1e-5), feature_layer=feature_layer,
        keep_class_token=keep_class_token and not siglip, class_token=not siglip, pre_norm=not siglip,
        patch_bias=siglip,
    )


def clip_config_to_hf(vision: VisionConfig) -> dict:
    """HF's CLIPVisionConfig, or SiglipVisionConfig for a tower without class token and pre-norm."""
    common = {"image_size": vision.image_size, "patch_size": vision.patch_size, "hidden_size": vision.hidden_size,
              "num_hidden_layers": vision.num_layers, "num_attention_heads": vision.num_heads,
              "intermediate_size": vision.ffn_hidden_size, "hidden_act": HF_ACTIVATIONS[vision.activation],
              "layer_norm_eps": vision.norm_eps}
    layout = (vision.class_token, vision.pre_norm, vision.patch_bias)
    if layout == (True, True, False):
        return {"model_type": "clip_vision_model", **common}
    if layout == (False, False, True):
        return {"model_type": "siglip_vision_model", "vision_use_head": False, **common}
    raise ValueError(f"HF has no CLIP or SigLIP vision tower with class_token={vision.class_token}, "
                     f"pre_norm={vision.pre_norm}, patch_bias={vision.patch_bias}")


# ---- BLIP-2 vision tower (EVA-style ViT: fused qkv, no pre-norm, final norm) -----------------------
def blip_vision_to_megavlm(hf: dict, src: str, out: dict, dst: str, vision: VisionConfig) -> None:
    out[dst + "class_token"] = _take(hf, src + "embeddings.class_embedding").reshape(-1)
    out[dst + "position_embeddings"] = _take(hf, src + "embeddings.position_embedding").reshape(-1, vision.hidden_size)
    for p in ("weight", "bias"):
        out[dst + f"patch_embed.{p}"] = _take(hf, src + f"embeddings.patch_embedding.{p}")
    heads, padded = vision.num_heads, vision.built_heads
    for i in range(vision.layers_to_build):
        h, m = f"{src}encoder.layers.{i}.", f"{dst}encoder.layers.{i}."
        for p in ("weight", "bias") if vision.qkv_bias else ("weight",):
            q, k, v = _take(hf, h + f"self_attn.qkv.{p}").chunk(3, 0)
            out[m + f"self_attention.linear_qkv.{p}"] = fuse_padded_qkv(q, k, v, heads, padded)
        for p in ("weight", "bias"):
            out[m + f"self_attention.linear_proj.{p}"] = _take(hf, h + f"self_attn.projection.{p}")
            out[m + f"input_layernorm.{p}"] = _take(hf, h + f"layer_norm1.{p}")
            out[m + f"pre_mlp_layernorm.{p}"] = _take(hf, h + f"layer_norm2.{p}")
            out[m + f"mlp.linear_fc1.{p}"] = _take(hf, h + f"mlp.fc1.{p}")
            out[m + f"mlp.linear_fc2.{p}"] = _take(hf, h + f"mlp.fc2.{p}")
        pad_projection(out, m + "self_attention.linear_proj.weight", heads, padded)
    if vision.post_norm:
        for p in ("weight", "bias"):
            out[dst + f"encoder.final_layernorm.{p}"] = _take(hf, src + f"post_layernorm.{p}")


def blip_vision_to_hf(full: dict, src: str, hf: dict, dst: str, vision: VisionConfig) -> None:
    hf[dst + "embeddings.class_embedding"] = full[src + "class_token"].reshape(1, 1, -1)
    hf[dst + "embeddings.position_embedding"] = full[src + "position_embeddings"].unsqueeze(0)
    for p in ("weight", "bias"):
        hf[dst + f"embeddings.patch_embedding.{p}"] = full[src + f"patch_embed.{p}"]
    heads, padded = vision.num_heads, vision.built_heads
    for i in range(vision.layers_to_build):
        m, h = f"{src}encoder.layers.{i}.", f"{dst}encoder.layers.{i}."
        for p in ("weight", "bias") if vision.qkv_bias else ("weight",):
            hf[h + f"self_attn.qkv.{p}"] = torch.cat(split_padded_qkv(full[m + f"self_attention.linear_qkv.{p}"],
                                                                      heads, padded))
        for p in ("weight", "bias"):
            hf[h + f"self_attn.projection.{p}"] = full[m + f"self_attention.linear_proj.{p}"]
            hf[h + f"layer_norm1.{p}"] = full[m + f"input_layernorm.{p}"]
            hf[h + f"layer_norm2.{p}"] = full[m + f"pre_mlp_layernorm.{p}"]
            hf[h + f"mlp.fc1.{p}"] = full[m + f"mlp.linear_fc1.{p}"]
            hf[h + f"mlp.fc2.{p}"] = full[m + f"mlp.linear_fc2.{p}"]
        strip_projection(hf, h + "self_attn.projection.weight", heads, padded)
    if vision.post_norm:
        for p in ("weight", "bias"):
            hf[dst + f"post_layernorm.{p}"] = full[src + f"encoder.final_layernorm.{p}"]


# ---- Q-Former (BERT naming) <-> megavlm -----------------------------------------------------------
def _qformer_pairs(q, text: bool) -> list[tuple[str, str, str]]:
    """(megavlm suffix, HF suffix, kind) per layer; kind: q | kv | proj (per head) | linear."""
    pairs = []
    for i in range(q.num_layers):
        m, h = f"layers.{i}.", f"encoder.layer.{i}."
        blocks = [("attention", "attention", "attention_norm")]
        if i % q.cross_attention_freq == 0:
            blocks.append(("cross_attention", "crossattention", "cross_norm"))
        for ours, theirs, norm in blocks:
            pairs += [(m + f"{ours}.linear_q", h + f"{theirs}.attention.query", "q"),
                      (m + f"{ours}.linear_kv", h + f"{theirs}.attention.", "kv"),
                      (m + f"{ours}.linear_proj", h + f"{theirs}.output.dense", "proj"),
                      (m + norm, h + f"{theirs}.output.LayerNorm", "linear")]
        ffns = [("mlp_query", "_query")] + ([("mlp_text", "")] if text else [])
        for ours, suffix in ffns:
            pairs += [(m + f"{ours}.linear_fc1", h + f"intermediate{suffix}.dense", "linear"),
                      (m + f"{ours}.linear_fc2", h + f"output{suffix}.dense", "linear"),
                      (m + f"{ours}_norm", h + f"output{suffix}.LayerNorm", "linear")]
    return pairs


def qformer_to_megavlm(hf: dict, src: str, query_key: str, embeddings: str | None, out: dict, dst: str, q) -> None:
    """src like 'qformer.'; query_key 'query_tokens'; embeddings like 'embeddings.' (text path) or None."""
    out[dst + "query_tokens"] = _take(hf, query_key).reshape(q.num_query_tokens, q.hidden_size)
    for p in ("weight", "bias"):
        out[dst + f"layernorm.{p}"] = _take(hf, src + f"layernorm.{p}")
    text = embeddings is not None and q.text_input
    heads, padded = q.num_heads, q.built_heads
    for ours, theirs, kind in _qformer_pairs(q, text):
        for p in ("weight", "bias"):
            if kind == "kv":
                out[dst + f"{ours}.{p}"] = fuse_padded_kv(_take(hf, src + theirs + f"key.{p}"),
                                                          _take(hf, src + theirs + f"value.{p}"), heads, padded)
            elif kind == "q":
                out[dst + f"{ours}.{p}"] = pad_heads(_take(hf, src + f"{theirs}.{p}"), heads, padded)
            else:
                out[dst + f"{ours}.{p}"] = _take(hf, src + f"{theirs}.{p}")
        if kind == "proj":
            pad_projection(out, dst + f"{ours}.weight", heads, padded)
    if text:
        out[dst + "word_embeddings.weight"] = _take(hf, embeddings + "word_embeddings.weight")
        out[dst + "position_embeddings.weight"] = _take(hf, embeddings + "position_embeddings.weight")


def qformer_to_hf(full: dict, src: str, hf: dict, dst: str, query_key: str, embeddings: str | None, q) -> None:
    hf[query_key] = full[src + "query_tokens"].unsqueeze(0)
    for p in ("weight", "bias"):
        hf[dst + f"layernorm.{p}"] = full[src + f"layernorm.{p}"]
    text = embeddings is not None and q.text_input
    heads, padded = q.num_heads, q.built_heads
    for ours, theirs, kind in _qformer_pairs(q, text):
        for p in ("weight", "bias"):
            if kind == "kv":
                k, v = split_padded_kv(full[src + f"{ours}.{p}"], heads, padded)
                hf[dst + theirs + f"key.{p}"], hf[dst + theirs + f"value.{p}"] = k, v
            elif kind == "q":
                hf[dst + f"{theirs}.{p}"] = strip_heads(full[src + f"{ours}.{p}"], heads, padded)
            else:
                hf[dst + f"{theirs}.{p}"] = full[src + f"{ours}.{p}"]
        if kind == "proj":
            strip_projection(hf, dst + f"{theirs}.weight", heads, padded)
    if text:
        hf[embeddings + "word_embeddings.weight"] = full[src + "word_embeddings.weight"]
        hf[embeddings + "position_embeddings.weight"] = full[src + "position_embeddings.weight"]


# ---- OPT decoder (learned positions with offset 2, LayerNorm, ReLU, biases) ------------------------
OPT_POSITION_OFFSET = 2


def opt_to_megavlm(hf: dict, src: str, head: str, out: dict, dst: str, lang: LanguageConfig) -> None:
    """src like 'language_model.model.decoder.'; head like 'language_model.lm_head.weight'."""
    out[dst + "embedding.word_embeddings.weight"] = _take(hf, src + "embed_tokens.weight")
    positions = _take(hf, src + "embed_positions.weight")[OPT_POSITION_OFFSET:]
    out[dst + "embedding.position_embeddings.weight"] = positions[: lang.max_seq_len]
    for i in range(lang.num_layers):
        h, m = f"{src}layers.{i}.", f"{dst}decoder.layers.{i}."
        for p in ("weight", "bias"):
            out[m + f"input_layernorm.{p}"] = _take(hf, h + f"self_attn_layer_norm.{p}")
            out[m + f"self_attention.linear_qkv.{p}"] = fuse_qkv(
                *(_take(hf, h + f"self_attn.{x}_proj.{p}") for x in "qkv"), lang.num_heads, lang.query_groups)
            out[m + f"self_attention.linear_proj.{p}"] = _take(hf, h + f"self_attn.out_proj.{p}")
            out[m + f"pre_mlp_layernorm.{p}"] = _take(hf, h + f"final_layer_norm.{p}")
            out[m + f"mlp.linear_fc1.{p}"] = _take(hf, h + f"fc1.{p}")
            out[m + f"mlp.linear_fc2.{p}"] = _take(hf, h + f"fc2.{p}")
    for p in ("weight", "bias"):
        out[dst + f"decoder.final_layernorm.{p}"] = _take(hf, src + f"final_layer_norm.{p}")
    if not lang.tie_embeddings:
        out[dst + "output_layer.weight"] = _take(hf, head)


def opt_to_hf(full: dict, src: str, hf: dict, dst: str, head: str, lang: LanguageConfig) -> None:
    hf[dst + "embed_tokens.weight"] = full[src + "embedding.word_embeddings.weight"]
    positions = full[src + "embedding.position_embeddings.weight"]
    hf[dst + "embed_positions.weight"] = torch.cat([positions.new_zeros(OPT_POSITION_OFFSET, positions.shape[1]),
                                                    positions])
    for i in range(lang.num_layers):
        m, h = f"{src}decoder.layers.{i}.", f"{dst}layers.{i}."
        for p in ("weight", "bias"):
            hf[h + f"self_attn_layer_norm.{p}"] = full[m + f"input_layernorm.{p}"]
            q, k, v = split_qkv(full[m + f"self_attention.linear_qkv.{p}"], lang.num_heads, lang.query_groups)
            hf[h + f"self_attn.q_proj.{p}"], hf[h + f"self_attn.k_proj.{p}"], hf[h + f"self_attn.v_proj.{p}"] = q, k, v
            hf[h + f"self_attn.out_proj.{p}"] = full[m + f"self_attention.linear_proj.{p}"]
            hf[h + f"final_layer_norm.{p}"] = full[m + f"pre_mlp_layernorm.{p}"]
            hf[h + f"fc1.{p}"] = full[m + f"mlp.linear_fc1.{p}"]
            hf[h + f"fc2.{p}"] = full[m + f"mlp.linear_fc2.{p}"]
    for p in ("weight", "bias"):
        hf[dst + f"final_layer_norm.{p}"] = full[src + f"decoder.final_layernorm.{p}"]
    if not lang.tie_embeddings:
        hf[head] = full[src + "output_layer.weight"]


def opt_config_from_hf(text: dict) -> LanguageConfig:
    check_supported("text_config", text, {"enable_bias": (True,), "layer_norm_elementwise_affine": (True,),
                                          "_remove_final_layer_norm": (False,)})
    if not text.get("do_layer_norm_before", True):
        raise ValueError("OPT with do_layer_norm_before: false (opt-350m) is not supported")
    if text.get("word_embed_proj_dim", text["hidden_size"]) != text["hidden_size"]:
        raise ValueError("OPT with word_embed_proj_dim != hidden_size (project_in/out) is not supported")
    if text.get("activation_function", "relu") != "relu":
        raise ValueError(f"OPT activation {text['activation_function']!r} is not supported (expected relu)")
    return LanguageConfig(
        vocab_size=text["vocab_size"], hidden_size=text["hidden_size"], num_layers=text["num_hidden_layers"],
        num_heads=text["num_attention_heads"], num_kv_heads=text["num_attention_heads"],
        ffn_hidden_size=text["ffn_dim"], max_seq_len=text.get("max_position_embeddings", 2048), norm_eps=1e-5,
        normalization="LayerNorm", activation="relu", position_embedding="learned", qkv_bias=True, linear_bias=True,
        tie_embeddings=bool(text.get("tie_word_embeddings", True)))


def opt_config_to_hf(lang: LanguageConfig) -> dict:
    return {"model_type": "opt", "vocab_size": lang.vocab_size, "hidden_size": lang.hidden_size,
            "num_hidden_layers": lang.num_layers, "num_attention_heads": lang.num_heads, "ffn_dim": lang.ffn_hidden_size,
            "max_position_embeddings": lang.max_seq_len, "word_embed_proj_dim": lang.hidden_size,
            "do_layer_norm_before": True, "activation_function": "relu", "enable_bias": True,
            "tie_word_embeddings": lang.tie_embeddings, "dropout": 0.0, "attention_dropout": 0.0}


# ---- SigLIP vision tower (CLIP's names without class token or pre-norm, a final post_layernorm) ---
def siglip_vision_to_megavlm(hf: dict, src: str, out: dict, dst: str, vision: VisionConfig) -> None:
    clip_vision_to_megavlm(hf, src, out, dst, vision)
    if vision.post_norm:
        for p in ("weight", "bias"):
            out[dst + f"encoder.final_layernorm.{p}"] = _take(hf, src + f"post_layernorm.{p}")


def siglip_vision_to_hf(full: dict, src: str, hf: dict, dst: str, vision: VisionConfig) -> None:
    clip_vision_to_hf(full, src, hf, dst, vision)
    if vision.post_norm:
        for p in ("weight", "bias"):
            hf[dst + f"post_layernorm.{p}"] = full[src + f"encoder.final_layernorm.{p}"]


def siglip_config_from_hf(vis: dict) -> VisionConfig:
    """The SigLIP vision tower without its attention-pooling head, read from its last layer
    through post_layernorm (PaliGemma's image features)."""
    check_supported("vision_config", vis, {"hidden_act": ("gelu_pytorch_tanh",), "num_channels": (3,),
                                           "attention_dropout": (0, 0.0), "vision_use_head": (False,)})
    return VisionConfig(
        image_size=vis["image_size"], patch_size=vis["patch_size"], hidden_size=vis["hidden_size"],
        num_layers=vis["num_hidden_layers"], num_heads=vis["num_attention_heads"],
        ffn_hidden_size=vis["intermediate_size"], activation="gelu_tanh", norm_eps=vis.get("layer_norm_eps", 1e-6),
        class_token=False, pre_norm=False, patch_bias=True, feature_layer=-1, post_norm=True)


def siglip_config_to_hf(vision: VisionConfig) -> dict:
    siglip = (vision.activation, vision.class_token, vision.pre_norm, vision.patch_bias, vision.post_norm,
              vision.feature_layer, vision.normalization, vision.qk_norm, vision.layer_scale, vision.qkv_bias)
    if siglip != ("gelu_tanh", False, False, True, True, -1, "LayerNorm", False, None, True):
        raise ValueError("an HF SigLIP vision tower is a tanh-GELU ViT without class token or pre-norm, with "
                         "biases and a final LayerNorm, read at its last layer")
    return {"model_type": "siglip_vision_model", "image_size": vision.image_size, "patch_size": vision.patch_size,
            "hidden_size": vision.hidden_size, "num_hidden_layers": vision.num_layers,
            "num_attention_heads": vision.num_heads, "intermediate_size": vision.ffn_hidden_size,
            "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": vision.norm_eps, "num_channels": 3,
            "vision_use_head": False, "attention_dropout": 0.0}


# ---- Gemma decoder (Llama's names and layout; zero-centred RMSNorm, GeGLU, scaled embeddings) ------
_GEMMA_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu")   # HF reads Gemma's legacy "gelu" as the tanh form


def gemma_config_from_hf(text: dict, section: str = "text_config") -> LanguageConfig:
    check_supported(section, text, {"model_type": ("gemma",), "hidden_act": _GEMMA_ACTIVATIONS,
                                    "hidden_activation": (None, *_GEMMA_ACTIVATIONS), "attention_bias": (False,),
                                    "attention_dropout": (0, 0.0), "rope_scaling": (None,)})
    rope = text.get("rope_parameters") or {}
    check_supported(f"{section}.rope_parameters", rope, {"rope_type": ("default",)})
    hidden, heads = text["hidden_size"], text["num_attention_heads"]
    head_dim = text.get("head_dim") or hidden // heads
    return LanguageConfig(
        vocab_size=text["vocab_size"], hidden_size=hidden, num_layers=text["num_hidden_layers"], num_heads=heads,
        num_kv_heads=text.get("num_key_value_heads") or heads, ffn_hidden_size=text["intermediate_size"],
        max_seq_len=text.get("max_position_embeddings", 8192),
        rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 10000.0))),
        norm_eps=text.get("rms_norm_eps", 1e-6), activation="geglu",
        kv_channels=head_dim if head_dim * heads != hidden else None, scale_embeddings=True, zero_centered_norm=True,
        tie_embeddings=bool(text.get("tie_word_embeddings", True)))


def gemma_config_to_hf(lang: LanguageConfig) -> dict:
    if (lang.normalization, lang.activation, lang.linear_bias, lang.qkv_bias, lang.position_embedding,
            lang.scale_embeddings, lang.zero_centered_norm, lang.qk_norm, lang.rotary_percent) != \
            ("RMSNorm", "geglu", False, False, "rope", True, True, False, 1.0):
        raise ValueError("an HF Gemma decoder has zero-centred RMSNorm, GeGLU, scaled embeddings, RoPE, no biases")
    return {"model_type": "gemma", "vocab_size": lang.vocab_size, "hidden_size": lang.hidden_size,
            "num_hidden_layers": lang.num_layers, "num_attention_heads": lang.num_heads,
            "num_key_value_heads": lang.query_groups, "head_dim": lang.head_dim,
            "intermediate_size": lang.ffn_hidden_size, "max_position_embeddings": lang.max_seq_len,
            "rms_norm_eps": lang.norm_eps, "hidden_act": "gelu_pytorch_tanh",
            "rope_parameters": {"rope_theta": lang.rope_theta, "rope_type": "default"},
            "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": lang.tie_embeddings}
