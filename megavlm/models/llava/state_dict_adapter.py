"""HF ``LlavaForConditionalGeneration`` (CLIP vision tower + Llama) <-> megavlm LLaVA, any TP/PP.

Used by ``tools/convert_checkpoint.py`` and by the HF parity tests, which check that both directions
reproduce HF's logits (tests/test_hf_parity_llava.py).
"""
from __future__ import annotations

import re

import torch

from megavlm.config.model import ConnectorConfig, ModelConfig
from megavlm.models.common import hf_blocks
from megavlm.models.common.adapter import ShardedAdapter
from megavlm.models.common.hf_io import renamed
from megavlm.models.common.sharding import ShardingPlan

VISION, PROJECTOR, LLM, HEAD = "model.vision_tower.", "model.multi_modal_projector.", "model.language_model.", "lm_head.weight"

# Checkpoints on disk use older names: transformers 4.x wrote (and 5.x still writes)
# "language_model.model.*" and "vision_tower[.vision_model].*"; the modules are named as above.
_LEGACY_NAMES = [
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^language_model\.(model\.)?"), LLM),
    (re.compile(r"^vision_tower\.(vision_model\.)?"), VISION),
    (re.compile(r"^multi_modal_projector\."), PROJECTOR),
]


def normalize_hf_names(hf: dict) -> dict:
    return renamed(hf, _LEGACY_NAMES)


class LlavaStateDictAdapter(ShardedAdapter):
    family = "LLaVA"   # in error messages
    not_in_hf: tuple[str, ...] = ()
    hf_decoder_layers = LLM + "layers"

    def __init__(self, model: ModelConfig, tp_size: int = 1, pp_size: int = 1, first_stage_layers=None,
                 last_stage_layers=None):
        self.model = model
        self.plan = ShardingPlan(
            whole_prefixes=("vision.",) if model.vision.tensor_parallel == 1 else (),
            tp_size=tp_size, pp_size=pp_size, num_layers=model.language.num_layers,
            vocab_size=model.language.vocab_size, first_stage_layers=first_stage_layers,
            last_stage_layers=last_stage_layers,
            gated_prefixes=("language_model.",) if model.language.gated else ())

    # ---- full (unsharded) form ----------------------------------------------------------
    def hf_to_full(self, hf: dict) -> dict:
        hf = normalize_hf_names(hf)
        full: dict = {}
        hf_blocks.clip_vision_to_megavlm(hf, VISION, full, "vision.", self.model.vision)
        for i in (1, 2) if self.model.connector.type == "mlp2x_gelu" else (1,):
            params = ("weight", "bias") if self.model.connector.bias else ("weight",)
            for p in params:
                full[f"connector.linear_fc{i}.{p}"] = hf[f"{PROJECTOR}linear_{i}.{p}"]
        hf_blocks.llama_to_megavlm(hf, LLM, HEAD, full, "language_model.", self.model.language)
        return full

    def full_to_hf(self, full: dict) -> dict:
        hf: dict = {}
        hf_blocks.clip_vision_to_hf(full, "vision.", hf, VISION, self.model.vision)
        for key, value in full.items():
            if key.startswith("connector."):
                i, p = re.match(r"connector\.linear_fc(\d)\.(\w+)", key).groups()
                hf[f"{PROJECTOR}linear_{i}.{p}"] = value
        hf_blocks.llama_to_hf(full, "language_model.", hf, LLM, HEAD, self.model.language)
        return hf

    # ---- per-process shards -------------------------------------------------------------
    def hf_to_megavlm(self, hf: dict, tp_rank: int = 0, pp_rank: int = 0) -> dict:
        """The local state dict of process (tp_rank, pp_rank), ready for ``model.load_state_dict``."""
        local = self.plan.shard(self.hf_to_full(hf), tp_rank, pp_rank)
        if self.model.language.tie_embeddings and pp_rank == self.plan.pp_size - 1 and pp_rank > 0:
            # The last stage keeps its own copy of the tied embedding as the output layer.
            embedding = self.hf_to_full(hf)["language_model.embedding.word_embeddings.weight"]
            local["language_model.output_layer.weight"] = self.plan.split(
                "language_model.output_layer.weight", embedding, tp_rank).clone()
        return local


    def components_to_megavlm(self, sources: dict[str, dict], tp_rank: int = 0, pp_rank: int = 0) -> dict:
        """Local state of the components taken from stand-alone HF models: ``vision`` from a CLIP
        or SigLIP checkpoint (the whole model or its vision tower), ``llm`` from a Llama
        checkpoint. A vocabulary smaller than the
        model's (Vicuna's 32000 vs LLaVA's 32064 with <image>) is padded with the mean embedding."""
        full: dict = {}
        if "vision" in sources and not hf_blocks.stand_alone_clip_tower(sources["vision"], full, "vision.",
                                                                         self.model.vision):
            raise ValueError(f"stage.init_components_from_hf.vision: {self.family} takes its vision tower from an HF "
                             "CLIP or SigLIP checkpoint (tensors under vision_model.)")
        if "llm" in sources:
            hf_blocks.llama_to_megavlm(sources["llm"], "model.", "lm_head.weight", full, "language_model.", self.model.language)
            for key in ("language_model.embedding.word_embeddings.weight", "language_model.output_layer.weight"):
                if key in full:
                    full[key] = _pad_rows(full[key], self.model.language.vocab_size, key)
        unknown = set(sources) - {"vision", "llm"}
        if unknown:
            raise ValueError(f"{self.family} loads stand-alone HF checkpoints for 'vision' and 'llm' only, not "
                             f"{sorted(unknown)}")
        return self.plan.shard(full, tp_rank, pp_rank)

    def unused_hf_keys(self, hf: dict) -> list[str]:
        """HF tensors megavlm does not hold: vision layers past the feature layer, the final norm."""
        used = set(self.full_to_hf(self.hf_to_full(hf)))
        return sorted(k for k in normalize_hf_names(hf) if k not in used)


def _pad_rows(weight: torch.Tensor, vocab_size: int, key: str) -> torch.Tensor:
    if weight.shape[0] > vocab_size:
        raise ValueError(f"{key}: the HF checkpoint has {weight.shape[0]} vocabulary rows, more than "
                         f"model.language.vocab_size={vocab_size}")
    if weight.shape[0] == vocab_size:
        return weight
    extra = weight.float().mean(0, keepdim=True).expand(vocab_size - weight.shape[0], -1).to(weight.dtype)
    return torch.cat([weight, extra])


def config_from_hf(hf_config: dict, flavor: str = "hf") -> ModelConfig:
    """ModelConfig from an HF LLaVA config.json dict."""
    layer = hf_config.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer={layer!r}: multi-layer vision features are not supported")
    strategy = hf_config.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ValueError(f"unknown vision_feature_select_strategy {strategy!r}")
    act = hf_config.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"projector_hidden_act {act!r} is not supported (expected 'gelu')")
    return ModelConfig(
        family="llava", flavor=flavor,
        vision=hf_blocks.clip_config_from_hf(hf_config["vision_config"], layer, strategy == "full"),
        language=hf_blocks.llama_config_from_hf(hf_config["text_config"]),
        connector=ConnectorConfig(type="mlp2x_gelu", bias=bool(hf_config.get("multimodal_projector_bias", True))),
        image_token_id=hf_config.get("image_token_id", hf_config.get("image_token_index", 32000)),
    )


def config_to_hf(model: ModelConfig) -> dict:
    if model.connector.type != "mlp2x_gelu":
        raise ValueError(f"HF LLaVA has no '{model.connector.type}' projector")
    return {
        "model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
        "vision_config": hf_blocks.clip_config_to_hf(model.vision),
        "text_config": hf_blocks.llama_config_to_hf(model.language),
        "image_token_id": model.image_token_id, "image_token_index": model.image_token_id,
        "projector_hidden_act": "gelu", "multimodal_projector_bias": model.connector.bias,
        "vision_feature_layer": model.vision.feature_layer,
        "vision_feature_select_strategy": "full" if model.vision.keep_class_token else "default",
        "image_seq_length": model.vision.tokens_per_image,
        "tie_word_embeddings": model.language.tie_embeddings,
    }


def complete_for_hf(model: ModelConfig, hf_state: dict, reference: dict | None = None) -> tuple[dict, dict]:
    """An HF config and state dict that ``LlavaForConditionalGeneration.from_pretrained`` loads
    without missing tensors. megavlm never holds the ViT layers past the feature layer nor the
    ViT's final norm: with ``reference`` (the original HF state) they are copied from it; without,
    the exported tower is cut to the layers it uses, read at layer -1 (the same features), and the
    final norm (unused by LLaVA) is the identity."""
    config = config_to_hf(model)
    state = dict(hf_state)
    if reference is not None:
        reference = normalize_hf_names(reference)
        missing = LlavaStateDictAdapter(model).unused_hf_keys(reference)
        state.update({k: reference[k] for k in missing})
        return config, state
    vision = model.vision
    config["vision_config"]["num_hidden_layers"] = vision.layers_to_build
    config["vision_feature_layer"] = -1
    hidden = vision.hidden_size
    dtype = state[VISION + "embeddings.position_embedding.weight"].dtype
    state[VISION + "post_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
    state[VISION + "post_layernorm.bias"] = torch.zeros(hidden, dtype=dtype)
    return config, state
