"""HF ``CLIPModel`` and ``SiglipModel`` <-> megavlm's contrastive model, any TP. Used by
tools/convert_checkpoint.py, the parity tests and the CLIP scorer (eval/clip_score.py)."""
from __future__ import annotations

import torch

from megavlm.config.model import ContrastiveConfig, LanguageConfig, ModelConfig
from megavlm.models.common import hf_blocks
from megavlm.models.common.adapter import ShardedAdapter
from megavlm.models.common.hf_blocks import _take
from megavlm.models.common.sharding import ShardingPlan, fuse_padded_kv, pad_heads, split_padded_kv, strip_heads

CLIP, SIGLIP = "CLIPModel", "SiglipModel"
MODEL_TYPES = {CLIP: "clip", SIGLIP: "siglip"}
_PREFIXES = ("vision.", "image_pool.", "text.", "image_projection.", "text_projection.", "objective.")


def hf_architecture(model: ModelConfig) -> str:
    """The HF class of this model: SigLIP's layout (sigmoid loss, attention pooling, bidirectional
    text read at its last position), or CLIP's."""
    c = model.contrastive
    siglip = (c.loss, c.image_pooling, c.text_pooling, c.causal_text, c.image_projection,
              c.text_projection_bias) == ("siglip", "attention", "last", False, False, True)
    clip = (c.loss, c.image_pooling, c.text_pooling, c.causal_text, c.image_projection,
            c.text_projection_bias) == ("clip", "class_token", "eot", True, True, False)
    if not (siglip or clip):
        raise ValueError("HF has CLIPModel (loss clip, class_token and eot pooling, projections without bias) and "
                         "SiglipModel (loss siglip, attention and last pooling, no image projection, a text head "
                         "with bias); this contrastive config is neither")
    return SIGLIP if siglip else CLIP


class ContrastiveStateDictAdapter(ShardedAdapter):
    not_in_hf: tuple[str, ...] = ()

    def __init__(self, model: ModelConfig, tp_size: int = 1, pp_size: int = 1, first_stage_layers=None,
                 last_stage_layers=None):
        self.model = model
        whole = ("vision.", "image_pool.") if model.vision.tensor_parallel == 1 else ()
        self.plan = ShardingPlan(tp_size=tp_size, pp_size=pp_size, num_layers=0, vocab_size=model.language.vocab_size,
                                 first_stage_prefixes=_PREFIXES, whole_prefixes=whole,
                                 gated_prefixes=("text.",) if model.language.activation == "swiglu" else ())

    @property
    def siglip(self) -> bool:
        return hf_architecture(self.model) == SIGLIP

    # ---- full (unsharded) form ----------------------------------------------------------
    def hf_to_full(self, hf: dict) -> dict:
        m, full = self.model, {}
        hf_blocks.clip_vision_to_megavlm(hf, "vision_model.", full, "vision.", m.vision)
        for p in ("weight", "bias"):
            full[f"vision.encoder.final_layernorm.{p}"] = _take(hf, f"vision_model.post_layernorm.{p}")
        if self.siglip:
            _attention_pool_to_megavlm(hf, "vision_model.head.", full, "image_pool.", m)
        else:
            full["image_projection.weight"] = _take(hf, "visual_projection.weight")
        _text_to_megavlm(hf, "text_model.", full, "text.", m.language)
        head = "text_model.head." if self.siglip else "text_projection."
        for p in ("weight", "bias") if self.siglip else ("weight",):
            full[f"text_projection.{p}"] = _take(hf, head + p)
        full["objective.logit_scale"] = _take(hf, "logit_scale").reshape(1)
        if self.siglip:
            full["objective.logit_bias"] = _take(hf, "logit_bias").reshape(1)
        return full

    def full_to_hf(self, full: dict) -> dict:
        m, hf = self.model, {}
        hf_blocks.clip_vision_to_hf(full, "vision.", hf, "vision_model.", m.vision)
        for p in ("weight", "bias"):
            hf[f"vision_model.post_layernorm.{p}"] = full[f"vision.encoder.final_layernorm.{p}"]
        if self.siglip:
            _attention_pool_to_hf(full, "image_pool.", hf, "vision_model.head.", m)
        else:
            hf["visual_projection.weight"] = full["image_projection.weight"]
        _text_to_hf(full, "text.", hf, "text_model.", m.language)
        head = "text_model.head." if self.siglip else "text_projection."
        for p in ("weight", "bias") if self.siglip else ("weight",):
            hf[head + p] = full[f"text_projection.{p}"]
        hf["logit_scale"] = full["objective.logit_scale"].reshape(1 if self.siglip else ())
        if self.siglip:
            hf["logit_bias"] = full["objective.logit_bias"].reshape(1)
        return hf

    def unused_hf_keys(self, hf: dict) -> list[str]:
        used = set(self.full_to_hf(self.hf_to_full(hf)))
        return sorted(k for k in hf if k not in used)


def _text_to_megavlm(hf: dict, src: str, out: dict, dst: str, lang: LanguageConfig) -> None:
    out[dst + "embedding.word_embeddings.weight"] = _take(hf, src + "embeddings.token_embedding.weight")
    out[dst + "embedding.position_embeddings.weight"] = _take(hf, src + "embeddings.position_embedding.weight")
    hf_blocks.clip_layers_to_megavlm(hf, src + "encoder.layers.", out, dst + "encoder.layers.", lang.num_layers,
                                     lang.num_heads, lang.num_heads)
    for p in ("weight", "bias"):
        out[dst + f"encoder.final_layernorm.{p}"] = _take(hf, src + f"final_layer_norm.{p}")


def _text_to_hf(full: dict, src: str, hf: dict, dst: str, lang: LanguageConfig) -> None:
    hf[dst + "embeddings.token_embedding.weight"] = full[src + "embedding.word_embeddings.weight"]
    hf[dst + "embeddings.position_embedding.weight"] = full[src + "embedding.position_embeddings.weight"]
    hf_blocks.clip_layers_to_hf(full, src + "encoder.layers.", hf, dst + "encoder.layers.", lang.num_layers,
                                lang.num_heads, lang.num_heads)
    for p in ("weight", "bias"):
        hf[dst + f"final_layer_norm.{p}"] = full[src + f"encoder.final_layernorm.{p}"]


def _attention_pool_to_megavlm(hf: dict, src: str, out: dict, dst: str, model: ModelConfig) -> None:
    """HF's multihead attention pooling head: nn.MultiheadAttention's packed [q; k; v] in_proj
    -> linear_q and the per-head interleaved linear_kv (with any dummy heads of the ViT)."""
    hidden, heads, padded = model.vision.hidden_size, model.vision.num_heads, model.vision.built_heads
    out[dst + "probe"] = _take(hf, src + "probe").reshape(hidden)
    for p, key in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
        q, k, v = _take(hf, src + f"attention.{key}").chunk(3, 0)
        out[dst + f"attention.linear_q.{p}"] = pad_heads(q, heads, padded)
        out[dst + f"attention.linear_kv.{p}"] = fuse_padded_kv(k, v, heads, padded)
        out[dst + f"attention.linear_proj.{p}"] = _take(hf, src + f"attention.out_proj.{p}")
        out[dst + f"norm.{p}"] = _take(hf, src + f"layernorm.{p}")
        out[dst + f"linear_fc1.{p}"] = _take(hf, src + f"mlp.fc1.{p}")
        out[dst + f"linear_fc2.{p}"] = _take(hf, src + f"mlp.fc2.{p}")
    hf_blocks.pad_projection(out, dst + "attention.linear_proj.weight", heads, padded)


def _attention_pool_to_hf(full: dict, src: str, hf: dict, dst: str, model: ModelConfig) -> None:
    hidden, heads, padded = model.vision.hidden_size, model.vision.num_heads, model.vision.built_heads
    hf[dst + "probe"] = full[src + "probe"].reshape(1, 1, hidden)
    for p, key in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
        q = strip_heads(full[src + f"attention.linear_q.{p}"], heads, padded)
        k, v = split_padded_kv(full[src + f"attention.linear_kv.{p}"], heads, padded)
        hf[dst + f"attention.{key}"] = torch.cat([q, k, v])
        hf[dst + f"attention.out_proj.{p}"] = full[src + f"attention.linear_proj.{p}"]
        hf[dst + f"layernorm.{p}"] = full[src + f"norm.{p}"]
        hf[dst + f"mlp.fc1.{p}"] = full[src + f"linear_fc1.{p}"]
        hf[dst + f"mlp.fc2.{p}"] = full[src + f"linear_fc2.{p}"]
    hf_blocks.strip_projection(hf, dst + "attention.out_proj.weight", heads, padded)


# ---- configs -----------------------------------------------------------------------------------
_TEXT_FIELDS = {"attention_dropout": (0, 0.0), "position_embedding_type": ("absolute",)}


def _text_config_from_hf(text: dict, siglip: bool) -> LanguageConfig:
    hf_blocks.check_supported("text_config", text, _TEXT_FIELDS)
    heads = text["num_attention_heads"]
    return LanguageConfig(
        vocab_size=text["vocab_size"], hidden_size=text["hidden_size"], num_layers=text["num_hidden_layers"],
        num_heads=heads, num_kv_heads=heads, ffn_hidden_size=text["intermediate_size"],
        max_seq_len=text.get("max_position_embeddings", 64 if siglip else 77),
        norm_eps=text.get("layer_norm_eps", 1e-6 if siglip else 1e-5), normalization="LayerNorm",
        activation=hf_blocks.activation_from_hf("text_config", text, "gelu_pytorch_tanh" if siglip else "quick_gelu"),
        position_embedding="learned", qkv_bias=True, linear_bias=True)


def config_from_hf(hf_config: dict, flavor: str = "hf") -> ModelConfig:
    """ModelConfig from an HF CLIPModel or SiglipModel config.json dict."""
    siglip = hf_config.get("model_type") == "siglip"
    text, vis = hf_config["text_config"], hf_config["vision_config"]
    eot = text.get("eos_token_id")
    eot = eot if isinstance(eot, int) and 0 <= eot < text["vocab_size"] else None
    vision = hf_blocks.clip_config_from_hf(vis, -1, True)
    vision.post_norm = True
    if siglip:
        hf_blocks.check_supported("vision_config", vis, {"vision_use_head": (True,)})
        contrastive = ContrastiveConfig(
            loss="siglip", embed_dim=text.get("projection_size") or text["hidden_size"], image_pooling="attention",
            text_pooling="last", causal_text=False, image_projection=False, text_projection_bias=True,
            logit_scale_init=0.0, logit_bias_init=0.0, max_logit_scale=None, eot_token_id=eot)
    else:
        contrastive = ContrastiveConfig(embed_dim=hf_config.get("projection_dim", 512),
                                        logit_scale_init=float(hf_config.get("logit_scale_init_value", 2.6592)),
                                        eot_token_id=eot)
    return ModelConfig(family="clip", flavor=flavor, head="contrastive", vision=vision,
                       language=_text_config_from_hf(text, siglip), contrastive=contrastive, image_token_id=0)


def config_to_hf(model: ModelConfig) -> dict:
    c, lang = model.contrastive, model.language
    siglip = hf_architecture(model) == SIGLIP
    if lang.normalization != "LayerNorm" or lang.num_kv_heads != lang.num_heads or not lang.linear_bias:
        raise ValueError("HF's CLIP/SigLIP text encoders have LayerNorm, multi-head attention and biases")
    vision = hf_blocks.clip_config_to_hf(model.vision)
    text = {"model_type": "siglip_text_model" if siglip else "clip_text_model", "vocab_size": lang.vocab_size,
            "hidden_size": lang.hidden_size, "intermediate_size": lang.ffn_hidden_size,
            "num_hidden_layers": lang.num_layers, "num_attention_heads": lang.num_heads,
            "max_position_embeddings": lang.max_seq_len, "hidden_act": hf_blocks.HF_ACTIVATIONS[lang.activation],
            "layer_norm_eps": lang.norm_eps, "bos_token_id": None, "pad_token_id": None,
            "eos_token_id": c.eot_token_id}
    if siglip:
        text["projection_size"] = c.embed_dim
        vision["vision_use_head"] = True
        return {"model_type": "siglip", "architectures": [SIGLIP], "text_config": text, "vision_config": vision}
    text["projection_dim"] = vision["projection_dim"] = c.embed_dim
    return {"model_type": "clip", "architectures": [CLIP], "text_config": text, "vision_config": vision,
            "projection_dim": c.embed_dim, "logit_scale_init_value": c.logit_scale_init}


def complete_for_hf(model: ModelConfig, hf_state: dict, reference: dict | None = None) -> tuple[dict, dict]:
    """megavlm holds every tensor the HF class has: the state is complete as it is."""
    return config_to_hf(model), dict(hf_state)
