"""HF ``InternVLForConditionalGeneration`` (InternVL vision + Qwen2) <-> megavlm InternVL, any TP/PP.

Used by ``tools/convert_checkpoint.py`` and the HF parity tests. The LLM side is the Llama
mapping (with QKV biases for Qwen2); the vision side and the projector are mapped here.
"""
from __future__ import annotations

import torch

from megavlm.config.model import ConnectorConfig, ModelConfig, VisionConfig
from megavlm.models.common import hf_blocks
from megavlm.models.common.hf_blocks import _take
from megavlm.models.common.sharding import fuse_padded_qkv, pad_heads, split_padded_qkv, strip_heads
from megavlm.models.llava.state_dict_adapter import LlavaStateDictAdapter, normalize_hf_names

VISION, PROJECTOR, LLM, HEAD = "model.vision_tower.", "model.multi_modal_projector.", "model.language_model.", "lm_head.weight"
ARCHITECTURE = "InternVLForConditionalGeneration"

# megavlm layer name <- HF layer name (both directions), InternViT layer
_LAYER = {
    "input_layernorm": "layernorm_before", "pre_mlp_layernorm": "layernorm_after",
    "self_attention.linear_proj": "attention.projection_layer", "mlp.linear_fc1": "mlp.fc1", "mlp.linear_fc2": "mlp.fc2",
}


def _norm_params(vision: VisionConfig) -> tuple[str, ...]:
    return ("weight",) if vision.normalization == "RMSNorm" else ("weight", "bias")


def _qkv_params(vision: VisionConfig) -> tuple[str, ...]:
    return ("weight", "bias") if vision.qkv_bias else ("weight",)


def internvit_to_megavlm(hf: dict, src: str, out: dict, dst: str, vision: VisionConfig) -> None:
    """With ``vision.padded_heads``, zero dummy heads are appended to q/k/v, the QK-norm weights and
    the output projection's input columns."""
    hidden, heads, padded = vision.hidden_size, vision.num_heads, vision.built_heads
    out[dst + "patch_embed.weight"] = _take(hf, src + "embeddings.patch_embeddings.projection.weight")
    out[dst + "patch_embed.bias"] = _take(hf, src + "embeddings.patch_embeddings.projection.bias")
    out[dst + "class_token"] = _take(hf, src + "embeddings.cls_token").reshape(hidden)
    out[dst + "position_embeddings"] = _take(hf, src + "embeddings.position_embeddings").reshape(-1, hidden)
    for i in range(vision.layers_to_build):
        h, m = f"{src}encoder.layer.{i}.", f"{dst}encoder.layers.{i}."
        for ours, theirs in _LAYER.items():
            params = _norm_params(vision) if ours.endswith("layernorm") else ("weight", "bias")
            for p in params:
                out[f"{m}{ours}.{p}"] = _take(hf, f"{h}{theirs}.{p}")
        for p in _qkv_params(vision):
            out[m + f"self_attention.linear_qkv.{p}"] = fuse_padded_qkv(
                *(_take(hf, f"{h}attention.{x}_proj.{p}") for x in "qkv"), heads, padded)
        hf_blocks.pad_projection(out, m + "self_attention.linear_proj.weight", heads, padded)
        if vision.qk_norm:
            for x in "qk":
                out[m + f"self_attention.{x}_layernorm.weight"] = pad_heads(_take(hf, h + f"attention.{x}_norm.weight"),
                                                                            heads, padded)
        out[m + "self_attention.linear_proj.layer_scale"] = _take(hf, h + "lambda_1")
        out[m + "mlp.linear_fc2.layer_scale"] = _take(hf, h + "lambda_2")
    if vision.post_norm:
        for p in _norm_params(vision):
            out[dst + f"encoder.final_layernorm.{p}"] = _take(hf, src + f"layernorm.{p}")


def internvit_to_hf(full: dict, src: str, hf: dict, dst: str, vision: VisionConfig) -> None:
    """Dummy heads (``vision.padded_heads``) are stripped."""
    hidden, heads, padded = vision.hidden_size, vision.num_heads, vision.built_heads
    hf[dst + "embeddings.patch_embeddings.projection.weight"] = full[src + "patch_embed.weight"]
    hf[dst + "embeddings.patch_embeddings.projection.bias"] = full[src + "patch_embed.bias"]
    hf[dst + "embeddings.cls_token"] = full[src + "class_token"].reshape(1, 1, hidden)
    hf[dst + "embeddings.position_embeddings"] = full[src + "position_embeddings"].reshape(1, -1, hidden)
    for i in range(vision.layers_to_build):
        m, h = f"{src}encoder.layers.{i}.", f"{dst}encoder.layer.{i}."
        for ours, theirs in _LAYER.items():
            params = _norm_params(vision) if ours.endswith("layernorm") else ("weight", "bias")
            for p in params:
                hf[f"{h}{theirs}.{p}"] = full[f"{m}{ours}.{p}"]
        for p in _qkv_params(vision):
            qkv = split_padded_qkv(full[m + f"self_attention.linear_qkv.{p}"], heads, padded)
            for x, t in zip("qkv", qkv):
                hf[h + f"attention.{x}_proj.{p}"] = t
        hf_blocks.strip_projection(hf, h + "attention.projection_layer.weight", heads, padded)
        if vision.qk_norm:
            for x in "qk":
                hf[h + f"attention.{x}_norm.weight"] = strip_heads(full[m + f"self_attention.{x}_layernorm.weight"],
                                                                   heads, padded)
        hf[h + "lambda_1"] = full[m + "self_attention.linear_proj.layer_scale"]
        hf[h + "lambda_2"] = full[m + "mlp.linear_fc2.layer_scale"]
    if vision.post_norm:
        for p in _norm_params(vision):
            hf[dst + f"layernorm.{p}"] = full[src + f"encoder.final_layernorm.{p}"]


class InternVLStateDictAdapter(LlavaStateDictAdapter):
    """The LLaVA adapter's sharding and TP/PP handling with InternVL's vision tower and projector."""

    def hf_to_full(self, hf: dict) -> dict:
        hf = normalize_hf_names(hf)  # on disk: "language_model.model.*", "vision_tower.*" (as LLaVA's)
        full: dict = {}
        internvit_to_megavlm(hf, VISION, full, "vision.", self.model.vision)
        for p in ("weight", "bias"):
            full[f"connector.layer_norm.{p}"] = _take(hf, f"{PROJECTOR}layer_norm.{p}")
            for i in (1, 2):
                full[f"connector.linear_fc{i}.{p}"] = _take(hf, f"{PROJECTOR}linear_{i}.{p}")
        hf_blocks.llama_to_megavlm(hf, LLM, HEAD, full, "language_model.", self.model.language)
        return full

    def full_to_hf(self, full: dict) -> dict:
        hf: dict = {}
        internvit_to_hf(full, "vision.", hf, VISION, self.model.vision)
        for p in ("weight", "bias"):
            hf[f"{PROJECTOR}layer_norm.{p}"] = full[f"connector.layer_norm.{p}"]
            for i in (1, 2):
                hf[f"{PROJECTOR}linear_{i}.{p}"] = full[f"connector.linear_fc{i}.{p}"]
        hf_blocks.llama_to_hf(full, "language_model.", hf, LLM, HEAD, self.model.language)
        return hf

    def components_to_megavlm(self, sources: dict[str, dict], tp_rank: int = 0, pp_rank: int = 0) -> dict:
        """``vision`` from a stand-alone HF ``InternVLVisionModel`` or a CLIP/SigLIP checkpoint (with
        a CLIP-shaped model.vision: no QK-norm, no LayerScale), ``llm`` from a Qwen2/Llama checkpoint."""
        full: dict = {}
        if "vision" in sources and not hf_blocks.stand_alone_clip_tower(sources["vision"], full, "vision.",
                                                                         self.model.vision):
            internvit_to_megavlm(sources["vision"], "", full, "vision.", self.model.vision)
        if "llm" in sources:
            hf_blocks.llama_to_megavlm(sources["llm"], "model.", "lm_head.weight", full, "language_model.",
                                       self.model.language)
            for key in ("language_model.embedding.word_embeddings.weight", "language_model.output_layer.weight"):
                if key in full:
                    full[key] = _fit_rows(full[key], self.model.language.vocab_size)
        unknown = set(sources) - {"vision", "llm"}
        if unknown:
            raise ValueError(f"InternVL loads stand-alone HF checkpoints for 'vision' and 'llm' only, not {sorted(unknown)}")
        return self.plan.shard(full, tp_rank, pp_rank)

    def unused_hf_keys(self, hf: dict) -> list[str]:
        used = set(self.full_to_hf(self.hf_to_full(hf)))
        return sorted(k for k in normalize_hf_names(hf) if k not in used)


def _fit_rows(weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Qwen2 checkpoints pad their embedding past the tokenizer (151936 rows for 151665 tokens);
    InternVL keeps vocab_size rows: extra rows are cut, missing ones get the mean embedding. The
    trainer checks that the tokenizer fits the model's vocabulary."""
    if weight.shape[0] >= vocab_size:
        return weight[:vocab_size]
    extra = weight.float().mean(0, keepdim=True).expand(vocab_size - weight.shape[0], -1).to(weight.dtype)
    return torch.cat([weight, extra])


def config_from_hf(hf_config: dict, flavor: str = "hf") -> ModelConfig:
    """ModelConfig from an HF InternVL config.json dict."""
    vis, text = hf_config["vision_config"], hf_config["text_config"]
    ratio = hf_config.get("downsample_ratio", 0.5)
    if ratio != 0.5:
        raise ValueError(f"downsample_ratio={ratio}: only InternVL's 0.5 pixel shuffle is supported")
    if hf_config.get("vision_feature_select_strategy", "default") != "default":
        raise ValueError("vision_feature_select_strategy 'full' keeps the class token, which pixel shuffle cannot take")
    layer = hf_config.get("vision_feature_layer", -1)
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer={layer!r}: multi-layer vision features are not supported")
    for key, expected in (("projector_hidden_act", "gelu"),):
        if hf_config.get(key, expected) != expected:
            raise ValueError(f"{key}={hf_config[key]!r} is not supported (expected {expected!r})")
    hf_blocks.check_supported("vision_config", vis, {
        "use_absolute_position_embeddings": (True,), "use_mask_token": (False,), "num_channels": (3,),
        "norm_type": ("layer_norm", "rms_norm"), "hidden_act": ("gelu", "quick_gelu"),
        "hidden_dropout_prob": (0, 0.0), "attention_dropout": (0, 0.0), "projection_dropout": (0, 0.0)})
    size, patch = vis.get("image_size", 448), vis.get("patch_size", 14)
    size = size[0] if isinstance(size, (list, tuple)) else size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    norm_type = vis.get("norm_type", "layer_norm")
    if norm_type == "rms_norm" and vis.get("use_mean_pooling", True) is False and layer == -1:
        raise ValueError("HF config field vision_config.use_mean_pooling=False with norm_type 'rms_norm' is not "
                         "supported: HF's final norm is then a LayerNorm after RMSNorm layers")
    vision = VisionConfig(
        image_size=size, patch_size=patch, hidden_size=vis["hidden_size"], num_layers=vis["num_hidden_layers"],
        num_heads=vis["num_attention_heads"], ffn_hidden_size=vis["intermediate_size"],
        activation=vis.get("hidden_act", "gelu"), norm_eps=vis.get("layer_norm_eps", 1e-6),
        pre_norm=False, patch_bias=True, feature_layer=layer,
        post_norm=not vis.get("use_mean_pooling", True) and layer == -1,
        normalization={"layer_norm": "LayerNorm", "rms_norm": "RMSNorm"}[norm_type],
        qk_norm=bool(vis.get("use_qk_norm", False)), layer_scale=float(vis.get("layer_scale_init_value", 0.1)),
        qkv_bias=bool(vis.get("attention_bias", False)))  # HF's default: InternViT-6B's bias-free q/k/v
    return ModelConfig(family="internvl", flavor=flavor, vision=vision, language=hf_blocks.llama_config_from_hf(text),
                       connector=ConnectorConfig(type="pixel_shuffle_mlp"),
                       image_token_id=hf_config.get("image_token_id", 151667))


def config_to_hf(model: ModelConfig) -> dict:
    vision = model.vision
    if model.connector.type != "pixel_shuffle_mlp" or not model.connector.bias:
        raise ValueError("HF InternVL has a biased pixel_shuffle_mlp projector only")
    if vision.pre_norm or vision.layer_scale is None or not vision.class_token or vision.keep_class_token:
        raise ValueError("HF InternVL vision has LayerScale and a dropped class token and no ln_pre")
    if vision.post_norm and vision.normalization == "RMSNorm":
        raise ValueError("HF InternVL's final vision norm is a LayerNorm: vision.post_norm needs normalization LayerNorm")
    return {
        "model_type": "internvl", "architectures": [ARCHITECTURE],
        "vision_config": {
            "model_type": "internvl_vision", "hidden_size": vision.hidden_size,
            "num_hidden_layers": vision.layers_to_build, "num_attention_heads": vision.num_heads,
            "intermediate_size": vision.ffn_hidden_size, "hidden_act": vision.activation,
            "layer_norm_eps": vision.norm_eps, "image_size": [vision.image_size] * 2,
            "patch_size": [vision.patch_size] * 2, "use_qk_norm": vision.qk_norm,
            "layer_scale_init_value": vision.layer_scale, "attention_bias": vision.qkv_bias,
            "norm_type": "rms_norm" if vision.normalization == "RMSNorm" else "layer_norm",
            "use_mean_pooling": not vision.post_norm, "use_absolute_position_embeddings": True,
        },
        "text_config": hf_blocks.llama_config_to_hf(model.language),
        "image_token_id": model.image_token_id, "image_seq_length": model.image_tokens,
        "downsample_ratio": 0.5, "projector_hidden_act": "gelu",
        # the exported tower holds the layers megavlm built: the features are its last layer's
        "vision_feature_layer": -1, "vision_feature_select_strategy": "default",
        "tie_word_embeddings": model.language.tie_embeddings,
    }


def complete_for_hf(model: ModelConfig, hf_state: dict, reference: dict | None = None) -> tuple[dict, dict]:
    """HF config + state for ``from_pretrained``. The exported tower is cut to the layers megavlm
    built and read at its last layer: the same features. ``reference`` adds HF tensors megavlm
    does not hold (layers past the feature layer) and keeps the original depth."""
    config, state = config_to_hf(model), dict(hf_state)
    if reference is not None:
        reference = normalize_hf_names(reference)
        missing = InternVLStateDictAdapter(model).unused_hf_keys(reference)
        if missing:
            state.update({k: reference[k] for k in missing})
            config["vision_config"]["num_hidden_layers"] = model.vision.num_layers
            config["vision_feature_layer"] = model.vision.feature_layer
    return config, state
