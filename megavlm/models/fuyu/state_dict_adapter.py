"""HF ``FuyuForCausalLM`` (patch projection + Persimmon) <-> megavlm Fuyu, any TP/PP.

Persimmon's fused ``query_key_value`` holds, per head, [q, k, v]: megatron-core's fused QKV layout
for multi-head attention (one query group per head), so it maps as it is. Its per-head QK
LayerNorms are replicated over TP. Used by ``tools/convert_checkpoint.py`` and the parity tests
(tests/test_fuyu_paligemma.py).
"""
from __future__ import annotations

import re

from megavlm.config.model import ConnectorConfig, LanguageConfig, ModelConfig, PatchInputConfig
from megavlm.models.common.adapter import ShardedAdapter
from megavlm.models.common.hf_io import renamed
from megavlm.models.common.hf_blocks import _take, check_supported
from megavlm.models.common.sharding import ShardingPlan

PROJECTION, LLM, HEAD = "model.vision_embed_tokens.", "model.language_model.", "lm_head.weight"
ARCHITECTURE = "FuyuForCausalLM"
# LoRA targets PEFT can name in a Persimmon layer (its q, k and v share one fused linear)
PERSIMMON_LORA_MODULES = {"o": "self_attn.dense", "up": "mlp.dense_h_to_4h", "down": "mlp.dense_4h_to_h"}

# Hub checkpoints (adept/fuyu-8b) use transformers 4.x names.
_LEGACY_NAMES = [
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^language_model\.(model\.)?"), LLM),
    (re.compile(r"^vision_embed_tokens\."), PROJECTION),
]
# megavlm layer suffix -> Persimmon layer suffix (each with .weight and .bias)
_LAYER = {"input_layernorm": "input_layernorm", "self_attention.linear_qkv": "self_attn.query_key_value",
          "self_attention.q_layernorm": "self_attn.q_layernorm", "self_attention.k_layernorm": "self_attn.k_layernorm",
          "self_attention.linear_proj": "self_attn.dense", "pre_mlp_layernorm": "post_attention_layernorm",
          "mlp.linear_fc1": "mlp.dense_h_to_4h", "mlp.linear_fc2": "mlp.dense_4h_to_h"}


def normalize_hf_names(hf: dict) -> dict:
    return renamed(hf, _LEGACY_NAMES)


def _pairs(lang: LanguageConfig):
    """(megavlm name, HF name) of every tensor of the decoder."""
    yield "language_model.embedding.word_embeddings.weight", LLM + "embed_tokens.weight"
    for i in range(lang.num_layers):
        for ours, theirs in _LAYER.items():
            if not lang.qk_norm and "layernorm" in ours and "self_attention" in ours:
                continue
            for p in ("weight", "bias"):
                yield f"language_model.decoder.layers.{i}.{ours}.{p}", f"{LLM}layers.{i}.{theirs}.{p}"
    for p in ("weight", "bias"):
        yield f"language_model.decoder.final_layernorm.{p}", f"{LLM}final_layernorm.{p}"
    if not lang.tie_embeddings:
        yield "language_model.output_layer.weight", HEAD


class FuyuStateDictAdapter(ShardedAdapter):
    not_in_hf: tuple[str, ...] = ()
    hf_decoder_layers = LLM + "layers"
    hf_lora_modules = PERSIMMON_LORA_MODULES

    def __init__(self, model: ModelConfig, tp_size: int = 1, pp_size: int = 1, first_stage_layers=None,
                 last_stage_layers=None):
        self.model = model
        self.plan = ShardingPlan(tp_size=tp_size, pp_size=pp_size, num_layers=model.language.num_layers,
                                 vocab_size=model.language.vocab_size, first_stage_layers=first_stage_layers,
                                 last_stage_layers=last_stage_layers, gated_prefixes=(), full_width_qk_norm=())

    def hf_to_full(self, hf: dict) -> dict:
        hf = normalize_hf_names(hf)
        full = {f"connector.linear_fc1.{p}": _take(hf, f"{PROJECTION}{p}") for p in ("weight", "bias")}
        full.update({ours: _take(hf, theirs) for ours, theirs in _pairs(self.model.language)})
        return full

    def full_to_hf(self, full: dict) -> dict:
        hf = {f"{PROJECTION}{p}": full[f"connector.linear_fc1.{p}"] for p in ("weight", "bias")}
        hf.update({theirs: full[ours] for ours, theirs in _pairs(self.model.language)})
        return hf

    def unused_hf_keys(self, hf: dict) -> list[str]:
        used = set(self.full_to_hf(self.hf_to_full(hf)))
        return sorted(k for k in normalize_hf_names(hf) if k not in used)


_PERSIMMON_FIELDS = {"hidden_act": ("relu2",), "attention_dropout": (0, 0.0), "hidden_dropout": (0, 0.0),
                     "rope_scaling": (None,)}


def persimmon_config_from_hf(text: dict) -> LanguageConfig:
    check_supported("text_config", text, {"model_type": ("persimmon",), **_PERSIMMON_FIELDS})
    rope = text.get("rope_parameters") or {}
    check_supported("text_config.rope_parameters", rope, {"rope_type": ("default",)})
    heads = text["num_attention_heads"]
    return LanguageConfig(
        vocab_size=text["vocab_size"], hidden_size=text["hidden_size"], num_layers=text["num_hidden_layers"],
        num_heads=heads, num_kv_heads=heads, ffn_hidden_size=text["intermediate_size"],
        max_seq_len=text.get("max_position_embeddings", 16384), norm_eps=text.get("layer_norm_eps", 1e-5),
        rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 25000.0))),
        rotary_percent=float(rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.5))),
        normalization="LayerNorm", activation="squared_relu", qkv_bias=True, linear_bias=True,
        qk_norm=bool(text.get("qk_layernorm", True)), tie_embeddings=bool(text.get("tie_word_embeddings", False)))


def persimmon_config_to_hf(lang: LanguageConfig) -> dict:
    if (lang.normalization, lang.activation, lang.linear_bias, lang.position_embedding, lang.query_groups,
            lang.kv_channels, lang.scale_embeddings, lang.zero_centered_norm) != \
            ("LayerNorm", "squared_relu", True, "rope", lang.num_heads, None, False, False):
        raise ValueError("HF Persimmon is LayerNorm + squared ReLU with biases, RoPE, multi-head attention")
    return {"model_type": "persimmon", "vocab_size": lang.vocab_size, "hidden_size": lang.hidden_size,
            "num_hidden_layers": lang.num_layers, "num_attention_heads": lang.num_heads,
            "intermediate_size": lang.ffn_hidden_size, "max_position_embeddings": lang.max_seq_len,
            "layer_norm_eps": lang.norm_eps, "hidden_act": "relu2", "qk_layernorm": lang.qk_norm,
            "rope_parameters": {"rope_theta": lang.rope_theta, "rope_type": "default",
                                "partial_rotary_factor": lang.rotary_percent},
            "tie_word_embeddings": lang.tie_embeddings, "hidden_dropout": 0.0, "attention_dropout": 0.0}


def config_from_hf(hf_config: dict, flavor: str = "hf") -> ModelConfig:
    """ModelConfig from an HF Fuyu config.json. The image-newline id and the largest image are the
    processor's (|NEWLINE| = 71019 and 1080 x 1920 for adept/fuyu-8b), kept in config.json by
    ``config_to_hf`` under their own keys."""
    check_supported("config", hf_config, {"num_channels": (3,)})
    default = PatchInputConfig()
    patches = PatchInputConfig(patch_size=hf_config.get("patch_size", 30),
                               max_height=hf_config.get("image_max_height", default.max_height),
                               max_width=hf_config.get("image_max_width", default.max_width),
                               newline_token_id=hf_config.get("image_newline_token_id", default.newline_token_id))
    return ModelConfig(family="fuyu", flavor=flavor, vision=None, patches=patches,
                       language=persimmon_config_from_hf(hf_config["text_config"]),
                       connector=ConnectorConfig(type="linear"), image_token_id=hf_config.get("image_token_id", 71011),
                       image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def config_to_hf(model: ModelConfig) -> dict:
    p = model.patches
    return {"model_type": "fuyu", "architectures": [ARCHITECTURE], "patch_size": p.patch_size, "num_channels": 3,
            "image_token_id": model.image_token_id, "tie_word_embeddings": model.language.tie_embeddings,
            "image_newline_token_id": p.newline_token_id, "image_max_height": p.max_height,
            "image_max_width": p.max_width, "text_config": persimmon_config_to_hf(model.language)}


def complete_for_hf(model: ModelConfig, hf_state: dict, reference: dict | None = None) -> tuple[dict, dict]:
    """Fuyu's HF checkpoint is exactly what megavlm holds."""
    return config_to_hf(model), dict(hf_state)


def hf_inputs(model_cfg: ModelConfig, batch: dict) -> dict:
    """HF Fuyu takes the patches of the whole batch (in sample order) as one sequence."""
    return {"pixel_values": batch["images"].unsqueeze(0)}
