"""HF ``PaliGemmaForConditionalGeneration`` (SigLIP + linear projector + Gemma) <-> megavlm
PaliGemma, any TP/PP.

Gemma's layers have Llama's names and layout; its norm weights are stored zero-centred by both
(the norm scales by 1 + weight), so they map as they are. Used by ``tools/convert_checkpoint.py``
and the parity tests (tests/test_fuyu_paligemma.py).
"""
from __future__ import annotations

import re

import torch

from megavlm.config.model import ConnectorConfig, ModelConfig
from megavlm.models.common import hf_blocks
from megavlm.models.common.hf_io import renamed
from megavlm.models.common.prefix_lm import prefix_length
from megavlm.models.llava.state_dict_adapter import LlavaStateDictAdapter

VISION, PROJECTOR = "model.vision_tower.", "model.multi_modal_projector."
LLM, HEAD = "model.language_model.", "lm_head.weight"
ARCHITECTURE = "PaliGemmaForConditionalGeneration"

# Hub checkpoints (google/paligemma-3b-pt-224) use transformers 4.x names.
_LEGACY_NAMES = [
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^language_model\.(model\.)?"), LLM),
    (re.compile(r"^vision_tower\.(vision_model\.)?"), VISION),
    (re.compile(r"^model\.vision_tower\.vision_model\."), VISION),
    (re.compile(r"^multi_modal_projector\."), PROJECTOR),
]


def normalize_hf_names(hf: dict) -> dict:
    return renamed(hf, _LEGACY_NAMES)


class PaliGemmaStateDictAdapter(LlavaStateDictAdapter):
    family = "PaliGemma"
    hf_decoder_layers = LLM + "layers"

    def hf_to_full(self, hf: dict) -> dict:
        hf = normalize_hf_names(hf)
        full: dict = {}
        hf_blocks.siglip_vision_to_megavlm(hf, VISION, full, "vision.", self.model.vision)
        for p in ("weight", "bias"):
            full[f"connector.linear_fc1.{p}"] = hf_blocks._take(hf, f"{PROJECTOR}linear.{p}")
        hf_blocks.llama_to_megavlm(hf, LLM, HEAD, full, "language_model.", self.model.language)
        return full

    def full_to_hf(self, full: dict) -> dict:
        hf: dict = {}
        hf_blocks.siglip_vision_to_hf(full, "vision.", hf, VISION, self.model.vision)
        for p in ("weight", "bias"):
            hf[f"{PROJECTOR}linear.{p}"] = full[f"connector.linear_fc1.{p}"]
        hf_blocks.llama_to_hf(full, "language_model.", hf, LLM, HEAD, self.model.language)
        return hf

    def unused_hf_keys(self, hf: dict) -> list[str]:
        used = set(self.full_to_hf(self.hf_to_full(hf)))
        tied = {HEAD} if self.model.language.tie_embeddings else set()
        return sorted(k for k in normalize_hf_names(hf) if k not in used | tied)


def config_from_hf(hf_config: dict, flavor: str = "hf") -> ModelConfig:
    text = hf_blocks.gemma_config_from_hf(hf_config["text_config"])
    text.tie_embeddings = bool(hf_config.get("tie_word_embeddings", text.tie_embeddings))
    if hf_config.get("projection_dim", text.hidden_size) != text.hidden_size:
        raise ValueError(f"HF config field projection_dim={hf_config['projection_dim']} differs from the text "
                         f"hidden_size {text.hidden_size}")
    return ModelConfig(
        family="paligemma", flavor=flavor, vision=hf_blocks.siglip_config_from_hf(hf_config["vision_config"]),
        language=text, connector=ConnectorConfig(type="linear"),
        image_token_id=hf_config.get("image_token_index", hf_config.get("image_token_id", 257152)), prefix_lm=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def config_to_hf(model: ModelConfig) -> dict:
    if model.connector.type != "linear" or not model.connector.bias:
        raise ValueError("HF PaliGemma's projector is one linear layer with a bias")
    if not model.prefix_lm:
        raise ValueError("HF PaliGemma attends bidirectionally over the prefix: model.prefix_lm must be true")
    lang = model.language
    return {"model_type": "paligemma", "architectures": [ARCHITECTURE],
            "vision_config": hf_blocks.siglip_config_to_hf(model.vision),
            "text_config": hf_blocks.gemma_config_to_hf(lang),
            "image_token_index": model.image_token_id, "vocab_size": lang.vocab_size,
            "projection_dim": lang.hidden_size, "hidden_size": lang.hidden_size,
            "tie_word_embeddings": lang.tie_embeddings}


def complete_for_hf(model: ModelConfig, hf_state: dict, reference: dict | None = None) -> tuple[dict, dict]:
    """megavlm holds every tensor of HF PaliGemma (the tied lm_head is the embedding)."""
    return config_to_hf(model), dict(hf_state)


def token_type_ids(batch: dict) -> torch.Tensor:
    """HF's prefix marker: 0 on each row's prefix, 1 after it."""
    ids = batch["input_ids"]
    prefix = batch.get("prefix_lengths")
    if prefix is None:
        prefix = torch.tensor([prefix_length(row.tolist()) for row in batch["labels"]])
    return (torch.arange(ids.shape[1])[None, :] >= prefix[:, None]).long()


def hf_inputs(model_cfg: ModelConfig, batch: dict) -> dict:
    return {"pixel_values": batch["images"], "token_type_ids": token_type_ids(batch)}
