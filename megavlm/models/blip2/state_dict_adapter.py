"""HF ``Blip2ForConditionalGeneration`` (head: lm) and ``Blip2ForImageTextRetrieval`` (head:
qformer) <-> megavlm BLIP-2, any TP/PP. Used by tools/convert_checkpoint.py and the parity tests."""
from __future__ import annotations

from megavlm.config.model import ConnectorConfig, ModelConfig, QFormerConfig
from megavlm.models.common import hf_blocks
from megavlm.models.common.adapter import LLAMA_LORA_MODULES, OPT_LORA_MODULES, ShardedAdapter
from megavlm.models.common.sharding import ShardingPlan

RETRIEVAL = "Blip2ForImageTextRetrieval"
HEADS = {"vision_projection": "vision_projection", "text_projection": "text_projection", "itm": "itm_head"}


class Blip2StateDictAdapter(ShardedAdapter):
    # megavlm tensors HF has no counterpart for: LAVIS's ITG head (BERT LM head) and ITC temperature
    not_in_hf = ("heads.itg_", "itg_bias", "temp")

    def __init__(self, model: ModelConfig, tp_size: int = 1, pp_size: int = 1, first_stage_layers=None,
                 last_stage_layers=None):
        self.model = model
        self.plan = ShardingPlan(
            whole_prefixes=(("vision.",) if model.vision.tensor_parallel == 1 else ())
            + (("qformer.",) if model.connector.tensor_parallel == 1 else ()),
            tp_size=tp_size, pp_size=pp_size, num_layers=model.language.num_layers if model.head == "lm" else 0,
            vocab_size=model.language.vocab_size, first_stage_layers=first_stage_layers,
            last_stage_layers=last_stage_layers, extra_vocab={"qformer.": model.qformer.vocab_size,
                                                              "itg_bias": model.qformer.vocab_size},
            first_stage_prefixes=("vision.", "qformer.", "language_projection.", "language_model.embedding.", "heads.",
                                  "itg_bias", "temp"),
            gated_prefixes=("language_model.",) if model.language.gated else ())

    @property
    def hf_decoder_layers(self) -> str | None:
        return None if self.model.head == "qformer" else self._llm()[2] + "layers"

    @property
    def hf_lora_modules(self) -> dict[str, str]:
        return OPT_LORA_MODULES if self.model.language.position_embedding == "learned" else LLAMA_LORA_MODULES

    def _llm(self):
        return (hf_blocks.opt_to_megavlm, hf_blocks.opt_to_hf, "language_model.model.decoder.") \
            if self.model.language.position_embedding == "learned" else \
            (hf_blocks.llama_to_megavlm, hf_blocks.llama_to_hf, "language_model.model.")

    def hf_to_full(self, hf: dict) -> dict:
        m, full = self.model, {}
        hf_blocks.blip_vision_to_megavlm(hf, "vision_model.", full, "vision.", m.vision)
        text = "embeddings." if m.head == "qformer" else None
        hf_blocks.qformer_to_megavlm(hf, "qformer.", "query_tokens", text, full, "qformer.", m.qformer)
        if m.head == "qformer":
            for ours, theirs in HEADS.items():
                for p in ("weight", "bias"):
                    full[f"heads.{ours}.{p}"] = hf[f"{theirs}.{p}"]
            return full
        for p in ("weight", "bias"):
            full[f"language_projection.{p}"] = hf[f"language_projection.{p}"]
        to_megavlm, _, src = self._llm()
        to_megavlm(hf, src, "language_model.lm_head.weight", full, "language_model.", m.language)
        return full

    def full_to_hf(self, full: dict) -> dict:
        m, hf = self.model, {}
        hf_blocks.blip_vision_to_hf(full, "vision.", hf, "vision_model.", m.vision)
        text = "embeddings." if m.head == "qformer" else None
        hf_blocks.qformer_to_hf(full, "qformer.", hf, "qformer.", "query_tokens", text, m.qformer)
        if m.head == "qformer":
            for ours, theirs in HEADS.items():
                for p in ("weight", "bias"):
                    hf[f"{theirs}.{p}"] = full[f"heads.{ours}.{p}"]
            return hf
        for p in ("weight", "bias"):
            hf[f"language_projection.{p}"] = full[f"language_projection.{p}"]
        _, to_hf, dst = self._llm()
        to_hf(full, "language_model.", hf, dst, "language_model.lm_head.weight", m.language)
        return hf


    def unused_hf_keys(self, hf: dict) -> list[str]:
        used = set(self.full_to_hf(self.hf_to_full(hf)))
        return sorted(k for k in hf if k not in used)


def config_from_hf(hf_config: dict, flavor: str = "hf") -> ModelConfig:
    vis, qf, text = hf_config["vision_config"], hf_config["qformer_config"], hf_config["text_config"]
    head = "qformer" if RETRIEVAL in (hf_config.get("architectures") or []) else "lm"
    vision = hf_blocks.clip_config_from_hf(vis, -1, True)
    vision.activation, vision.norm_eps = vis.get("hidden_act", "gelu"), vis.get("layer_norm_eps", 1e-6)
    vision.class_token, vision.pre_norm, vision.patch_bias, vision.post_norm = True, False, True, True
    vision.qkv_bias = bool(vis.get("qkv_bias", True))
    hf_blocks.check_supported("qformer_config", qf, {"position_embedding_type": ("absolute",),
                                                     "hidden_act": ("gelu",), "num_channels": (3,)})
    qformer = QFormerConfig(
        hidden_size=qf["hidden_size"], num_layers=qf["num_hidden_layers"], num_heads=qf["num_attention_heads"],
        ffn_hidden_size=qf["intermediate_size"], num_query_tokens=hf_config.get("num_query_tokens", 32),
        cross_attention_freq=qf.get("cross_attention_frequency", 2), vocab_size=qf["vocab_size"],
        max_position_embeddings=qf["max_position_embeddings"], norm_eps=qf.get("layer_norm_eps", 1e-12),
        embed_dim=hf_config.get("image_text_hidden_size", 256),
        dec_token_id=qf.get("bos_token_id") or 1)
    language = (hf_blocks.opt_config_from_hf(text) if text.get("model_type", "opt") == "opt"
                else hf_blocks.llama_config_from_hf(text))
    image_token = hf_config.get("image_token_index", hf_config.get("image_token_id"))
    return ModelConfig(family="blip2", flavor=flavor, head=head, vision=vision, qformer=qformer, language=language,
                       connector=ConnectorConfig(type="qformer"),
                       image_token_id=image_token if image_token is not None else language.vocab_size - 1)


def config_to_hf(model: ModelConfig) -> dict:
    v, q, lang = model.vision, model.qformer, model.language
    text = hf_blocks.opt_config_to_hf(lang) if lang.position_embedding == "learned" else hf_blocks.llama_config_to_hf(lang)
    return {
        "model_type": "blip-2",
        "architectures": [RETRIEVAL if model.head == "qformer" else "Blip2ForConditionalGeneration"],
        "vision_config": {"model_type": "blip_2_vision_model", "hidden_size": v.hidden_size,
                          "intermediate_size": v.ffn_hidden_size, "num_hidden_layers": v.num_layers,
                          "num_attention_heads": v.num_heads, "image_size": v.image_size, "patch_size": v.patch_size,
                          "hidden_act": v.activation, "layer_norm_eps": v.norm_eps, "qkv_bias": v.qkv_bias},
        "qformer_config": {"model_type": "blip_2_qformer", "hidden_size": q.hidden_size,
                           "num_hidden_layers": q.num_layers, "num_attention_heads": q.num_heads,
                           "intermediate_size": q.ffn_hidden_size, "cross_attention_frequency": q.cross_attention_freq,
                           "encoder_hidden_size": v.hidden_size, "vocab_size": q.vocab_size,
                           "max_position_embeddings": q.max_position_embeddings, "layer_norm_eps": q.norm_eps,
                           "use_qformer_text_input": model.head == "qformer"},
        "text_config": text,
        "num_query_tokens": q.num_query_tokens,
        "image_text_hidden_size": q.embed_dim,
        "image_token_index": model.image_token_id if model.head == "lm" else None,
        "tie_word_embeddings": lang.tie_embeddings,
    }


def complete_for_hf(model: ModelConfig, hf_state: dict, reference: dict | None = None) -> tuple[dict, dict]:
    """BLIP-2 holds every HF tensor (all ViT layers run): the state is complete as it is."""
    state = dict(hf_state)
    if reference is not None:
        state.update({k: v for k, v in reference.items() if k not in state})
    return config_to_hf(model), state
