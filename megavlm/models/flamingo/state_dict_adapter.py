"""HF ``IdeficsForVisionText2Text`` (the open Flamingo reproduction) <-> megavlm Flamingo, any TP/PP.

IDEFICS keeps its added tokens (``additional_vocab_size``) in separate embedding / output
tensors; megavlm holds them as the last rows of one vocabulary. Used by tools/convert_checkpoint.py
and the parity tests.
"""
from __future__ import annotations

import torch

from megavlm.config.model import ConnectorConfig, FlamingoConfig, ModelConfig, VisionConfig
from megavlm.models.common import hf_blocks
from megavlm.models.common.adapter import ShardedAdapter
from megavlm.models.common.sharding import (ShardingPlan, fuse_kv, fuse_padded_kv, pad_heads, split_kv,
                                            split_padded_kv, strip_heads)

VISION, RESAMPLER, XATTN = "model.vision_model.", "model.perceiver_resampler.", "model.gated_cross_attn_layers."
EMBED, HEAD = "model.embed_tokens.", "lm_head."
ARCHITECTURE = "IdeficsForVisionText2Text"


def _take(hf: dict, key: str) -> torch.Tensor:
    try:
        return hf[key]
    except KeyError:
        raise KeyError(f"HF checkpoint has no tensor {key!r}") from None


class FlamingoStateDictAdapter(ShardedAdapter):
    # megavlm tensors without an IDEFICS counterpart: frame embeddings (video / multi-frame media)
    not_in_hf = ("resampler.frame_embeddings",)
    hf_decoder_layers = "model.layers"

    def __init__(self, model: ModelConfig, tp_size: int = 1, pp_size: int = 1, first_stage_layers=None,
                 last_stage_layers=None):
        self.model = model
        self.plan = ShardingPlan(
            whole_prefixes=(("vision.",) if model.vision.tensor_parallel == 1 else ())
            + (("resampler.",) if model.connector.tensor_parallel == 1 else ()),
            tp_size=tp_size, pp_size=pp_size, num_layers=model.language.num_layers,
            vocab_size=model.language.vocab_size, first_stage_layers=first_stage_layers,
            last_stage_layers=last_stage_layers,
            first_stage_prefixes=("vision.", "resampler.", "language_model.embedding."),
            gated_prefixes=("language_model.",))

    # ---- full (unsharded) form ----------------------------------------------------------
    def _blocks(self):
        """(HF index j, megavlm layer prefix) of each gated cross-attention block."""
        interval = self.model.flamingo.cross_attention_interval
        return [(j, f"language_model.decoder.layers.{j * interval}.gated_xattn.")
                for j in range(self.model.language.num_layers // interval)]

    def hf_to_full(self, hf: dict) -> dict:
        m, f, full = self.model, self.model.flamingo, {}
        hf_blocks.clip_vision_to_megavlm(hf, VISION, full, "vision.", m.vision)
        if m.flamingo.use_resampler:
            self._resampler_to_full(hf, full)
        joined = dict(hf)
        for key, extra in ((EMBED + "weight", EMBED + "additional_embedding.weight"),
                           (HEAD + "weight", HEAD + "additional_fc.weight")):
            if f.hf_additional_vocab:
                joined[key] = torch.cat([_take(hf, key), _take(hf, extra)])
        hf_blocks.llama_to_megavlm(joined, "model.", HEAD + "weight", full, "language_model.", m.language)
        for j, ours in self._blocks():
            theirs = f"{XATTN}{j}."
            for gate in ("attn", "dense"):
                alpha = _take(hf, f"{theirs}alpha_{'cross_attn' if gate == 'attn' else 'dense'}")
                full[f"{ours}alpha_{gate}"] = alpha.reshape(-1)
            full[ours + "input_layernorm.weight"] = _take(hf, theirs + "input_layernorm.weight")
            full[ours + "pre_mlp_layernorm.weight"] = _take(hf, theirs + "post_attention_layernorm.weight")
            full[ours + "attention.linear_q.weight"] = _take(hf, theirs + "cross_attn.q_proj.weight")
            full[ours + "attention.linear_kv.weight"] = fuse_kv(_take(hf, theirs + "cross_attn.k_proj.weight"),
                                                                _take(hf, theirs + "cross_attn.v_proj.weight"),
                                                                m.language.num_heads)
            full[ours + "attention.linear_proj.weight"] = _take(hf, theirs + "cross_attn.o_proj.weight")
            full[ours + "mlp.linear_fc1.weight"] = torch.cat([_take(hf, theirs + "mlp.gate_proj.weight"),
                                                              _take(hf, theirs + "mlp.up_proj.weight")])
            full[ours + "mlp.linear_fc2.weight"] = _take(hf, theirs + "mlp.down_proj.weight")
        return full

    def _resampler_to_full(self, hf: dict, full: dict) -> None:
        f = self.model.flamingo
        heads, padded = f.resampler_heads, f.resampler_built_heads  # zero dummy heads up to padded
        full["resampler.latents"] = _take(hf, RESAMPLER + "latents")
        for p in ("weight", "bias"):
            full[f"resampler.final_norm.{p}"] = _take(hf, RESAMPLER + f"layer_norm.{p}")
        for i in range(f.resampler_depth):
            attn, ffn, ours = f"{RESAMPLER}blocks.{i}.0.", f"{RESAMPLER}blocks.{i}.1.", f"resampler.layers.{i}."
            for p in ("weight", "bias"):
                full[ours + f"context_norm.{p}"] = _take(hf, attn + f"context_layer_norm.{p}")
                full[ours + f"latents_norm.{p}"] = _take(hf, attn + f"latents_layer_norm.{p}")
                full[ours + f"mlp_norm.{p}"] = _take(hf, ffn + f"ln.{p}")
            full[ours + "attention.linear_q.weight"] = pad_heads(_take(hf, attn + "q_proj.weight"), heads, padded)
            full[ours + "attention.linear_kv.weight"] = fuse_padded_kv(
                _take(hf, attn + "k_proj.weight"), _take(hf, attn + "v_proj.weight"), heads, padded)
            full[ours + "attention.linear_proj.weight"] = _take(hf, attn + "output_proj.weight")
            hf_blocks.pad_projection(full, ours + "attention.linear_proj.weight", heads, padded)
            full[ours + "linear_fc1.weight"] = _take(hf, ffn + "fc.weight")
            full[ours + "linear_fc2.weight"] = _take(hf, ffn + "c_proj.weight")

    def full_to_hf(self, full: dict) -> dict:
        m, f, hf = self.model, self.model.flamingo, {}
        hf_blocks.clip_vision_to_hf(full, "vision.", hf, VISION, m.vision)
        if f.use_resampler:
            self._resampler_to_hf(full, hf)
        hf_blocks.llama_to_hf(full, "language_model.", hf, "model.", HEAD + "weight", m.language)
        if f.hf_additional_vocab:
            keep = m.language.vocab_size - f.hf_additional_vocab
            for key, extra in ((EMBED + "weight", EMBED + "additional_embedding.weight"),
                               (HEAD + "weight", HEAD + "additional_fc.weight")):
                if key in hf:
                    hf[key], hf[extra] = hf[key][:keep], hf[key][keep:]
        gate_shape = (1, 1, -1) if f.gate_type == "vector" else (1,)
        for j, ours in self._blocks():
            theirs = f"{XATTN}{j}."
            hf[theirs + "alpha_cross_attn"] = full[ours + "alpha_attn"].reshape(gate_shape)
            hf[theirs + "alpha_dense"] = full[ours + "alpha_dense"].reshape(gate_shape)
            hf[theirs + "input_layernorm.weight"] = full[ours + "input_layernorm.weight"]
            hf[theirs + "post_attention_layernorm.weight"] = full[ours + "pre_mlp_layernorm.weight"]
            hf[theirs + "cross_attn.q_proj.weight"] = full[ours + "attention.linear_q.weight"]
            k, v = split_kv(full[ours + "attention.linear_kv.weight"], m.language.num_heads)
            hf[theirs + "cross_attn.k_proj.weight"], hf[theirs + "cross_attn.v_proj.weight"] = k, v
            hf[theirs + "cross_attn.o_proj.weight"] = full[ours + "attention.linear_proj.weight"]
            gate, up = full[ours + "mlp.linear_fc1.weight"].chunk(2, 0)
            hf[theirs + "mlp.gate_proj.weight"], hf[theirs + "mlp.up_proj.weight"] = gate, up
            hf[theirs + "mlp.down_proj.weight"] = full[ours + "mlp.linear_fc2.weight"]
        return hf

    # ---- per-process shards -------------------------------------------------------------

    def components_to_megavlm(self, sources: dict[str, dict], tp_rank: int = 0, pp_rank: int = 0) -> dict:
        """The frozen parts from stand-alone HF models: ``vision`` from a CLIP (vision) checkpoint,
        ``llm`` from a Llama checkpoint; the resampler and the blocks keep their initialisation."""
        from megavlm.models.llava.state_dict_adapter import _pad_rows

        unknown = set(sources) - {"vision", "llm"}
        if unknown:
            raise ValueError(f"Flamingo loads stand-alone HF checkpoints for 'vision' and 'llm' only, not {sorted(unknown)}")
        full: dict = {}
        if "vision" in sources:
            clip = {k[len("vision_model."):]: v for k, v in sources["vision"].items() if k.startswith("vision_model.")}
            hf_blocks.clip_vision_to_megavlm(clip, "", full, "vision.", self.model.vision)
        if "llm" in sources:
            hf_blocks.llama_to_megavlm(sources["llm"], "model.", "lm_head.weight", full, "language_model.",
                                       self.model.language)
            for key in ("language_model.embedding.word_embeddings.weight", "language_model.output_layer.weight"):
                if key in full:
                    full[key] = _pad_rows(full[key], self.model.language.vocab_size, key)
        return self.plan.shard(full, tp_rank, pp_rank)

    def _resampler_to_hf(self, full: dict, hf: dict) -> None:
        f = self.model.flamingo
        heads, padded = f.resampler_heads, f.resampler_built_heads  # dummy heads stripped
        hf[RESAMPLER + "latents"] = full["resampler.latents"]
        for p in ("weight", "bias"):
            hf[RESAMPLER + f"layer_norm.{p}"] = full[f"resampler.final_norm.{p}"]
        for i in range(f.resampler_depth):
            attn, ffn, ours = f"{RESAMPLER}blocks.{i}.0.", f"{RESAMPLER}blocks.{i}.1.", f"resampler.layers.{i}."
            for p in ("weight", "bias"):
                hf[attn + f"context_layer_norm.{p}"] = full[ours + f"context_norm.{p}"]
                hf[attn + f"latents_layer_norm.{p}"] = full[ours + f"latents_norm.{p}"]
                hf[ffn + f"ln.{p}"] = full[ours + f"mlp_norm.{p}"]
            hf[attn + "q_proj.weight"] = strip_heads(full[ours + "attention.linear_q.weight"], heads, padded)
            hf[attn + "k_proj.weight"], hf[attn + "v_proj.weight"] = split_padded_kv(
                full[ours + "attention.linear_kv.weight"], heads, padded)
            hf[attn + "output_proj.weight"] = full[ours + "attention.linear_proj.weight"]
            hf_blocks.strip_projection(hf, attn + "output_proj.weight", heads, padded)
            hf[ffn + "fc.weight"] = full[ours + "linear_fc1.weight"]
            hf[ffn + "c_proj.weight"] = full[ours + "linear_fc2.weight"]

    def unused_hf_keys(self, hf: dict) -> list[str]:
        """HF tensors megavlm does not hold: the ViT's final norm (IDEFICS never uses it)."""
        used = set(self.full_to_hf(self.hf_to_full(hf)))
        return sorted(k for k in hf if k not in used)


def config_from_hf(hf_config: dict, flavor: str = "hf") -> ModelConfig:
    vis, per = hf_config["vision_config"], hf_config.get("perceiver_config") or {}
    if hf_config.get("qk_layer_norms") or per.get("qk_layer_norms_perceiver"):
        raise ValueError("IDEFICS with qk_layer_norms is not supported")
    additional = int(hf_config.get("additional_vocab_size", 0))
    language = hf_blocks.llama_config_from_hf(dict(hf_config, vocab_size=hf_config["vocab_size"] + additional),
                                              section="config")
    vision = VisionConfig(
        image_size=vis["image_size"], patch_size=vis["patch_size"], hidden_size=vis["embed_dim"],
        num_layers=vis["num_hidden_layers"], num_heads=vis["num_attention_heads"], ffn_hidden_size=vis["intermediate_size"],
        activation=vis.get("hidden_act", "gelu"), norm_eps=vis.get("layer_norm_eps", 1e-5), feature_layer=-1,
        keep_class_token=True)
    flamingo = FlamingoConfig(
        num_latents=per.get("resampler_n_latents", 64), resampler_depth=per.get("resampler_depth", 6),
        resampler_heads=per.get("resampler_n_heads", 16), resampler_head_dim=per.get("resampler_head_dim", 96),
        cross_attention_interval=hf_config.get("cross_layer_interval", 1), gate_type=hf_config.get("alpha_type", "float"),
        hf_additional_vocab=additional, max_media=hf_config.get("megavlm_max_media", 5),
        media_attention=hf_config.get("megavlm_media_attention", "most_recent"),
        use_resampler=bool(hf_config.get("use_resampler", False)))
    image_token = hf_config.get("image_token_id")
    return ModelConfig(family="flamingo", flavor=flavor, connector=ConnectorConfig(type="perceiver"), vision=vision,
                       language=language, flamingo=flamingo,
                       image_token_id=image_token if image_token is not None else language.vocab_size - 1)


def config_to_hf(model: ModelConfig) -> dict:
    v, lang, f = model.vision, model.language, model.flamingo
    problems = {
        "flamingo.max_frames": f.max_frames != 1,
        "flamingo.resampler_ffn_mult (IDEFICS uses 4)": f.resampler_ffn_mult != 4,
        "language.num_kv_heads (IDEFICS has no grouped-query attention)": lang.query_groups != lang.num_heads,
        "language (IDEFICS' decoder is Llama-style)": (lang.normalization, lang.activation, lang.position_embedding,
                                                        lang.qkv_bias) != ("RMSNorm", "swiglu", "rope", False),
        "vision (IDEFICS reads the last layer with the class token, no final norm)":
            (v.feature_layer, v.keep_class_token, v.pre_norm, v.post_norm, v.patch_bias) != (-1, True, True, False, False),
    }
    bad = [key for key, wrong in problems.items() if wrong]
    if bad:
        raise ValueError(f"this Flamingo config has no IDEFICS equivalent: {', '.join(bad)}")
    text = hf_blocks.llama_config_to_hf(lang)
    text.pop("model_type")
    return dict(
        text, model_type="idefics", architectures=[ARCHITECTURE], vocab_size=lang.vocab_size - f.hf_additional_vocab,
        additional_vocab_size=f.hf_additional_vocab, cross_layer_interval=f.cross_attention_interval,
        alpha_initializer="zeros", alpha_type=f.gate_type, qk_layer_norms=False, use_resampler=f.use_resampler,
        image_token_id=model.image_token_id,
        # how megavlm builds the media mask IDEFICS receives as image_attention_mask (kept for the way back)
        megavlm_max_media=f.max_media, megavlm_media_attention=f.media_attention,
        vision_config={"model_type": "idefics_vision", "embed_dim": v.hidden_size, "image_size": v.image_size,
                       "patch_size": v.patch_size, "num_hidden_layers": v.num_layers,
                       "num_attention_heads": v.num_heads, "intermediate_size": v.ffn_hidden_size,
                       "hidden_act": v.activation, "layer_norm_eps": v.norm_eps},
        perceiver_config={"model_type": "idefics_perciever", "use_resampler": f.use_resampler,
                          "resampler_n_latents": f.num_latents, "resampler_depth": f.resampler_depth,
                          "resampler_n_heads": f.resampler_heads, "resampler_head_dim": f.resampler_head_dim,
                          "qk_layer_norms_perceiver": False})


def hf_inputs(model: ModelConfig, batch: dict) -> dict:
    """IDEFICS' image arguments for a megavlm batch: each sample's images padded to a common
    count ([b, images, 3, H, W]) and the media mask as ``image_attention_mask`` [b, s, images]."""
    from megavlm.models.flamingo.fusion import media_mask

    per_sample, images = batch["images_per_sample"], batch["images"]
    slots = max(int(per_sample.max()), 1)
    pixels = images.new_zeros(len(per_sample), slots, *images.shape[1:])
    first = 0
    for row, count in enumerate(per_sample.tolist()):
        pixels[row, :count] = images[first:first + count]
        first += count
    blocked = media_mask(batch["input_ids"], per_sample, model.image_token_id, slots, 1,
                         model.flamingo.media_attention == "all_previous")[:, 0]
    return {"pixel_values": pixels, "image_attention_mask": (~blocked).long()}


def complete_for_hf(model: ModelConfig, hf_state: dict, reference: dict | None = None) -> tuple[dict, dict]:
    """An HF config and state dict ``IdeficsForVisionText2Text.from_pretrained`` loads without
    missing tensors: the ViT's final norm (unused) from ``reference``, else the identity."""
    state = dict(hf_state)
    if reference is not None:
        state.update({k: v for k, v in reference.items() if k not in state})
    else:
        width = model.vision.hidden_size
        dtype = state[VISION + "embeddings.position_embedding.weight"].dtype
        state[VISION + "post_layernorm.weight"] = torch.ones(width, dtype=dtype)
        state[VISION + "post_layernorm.bias"] = torch.zeros(width, dtype=dtype)
    return config_to_hf(model), state
