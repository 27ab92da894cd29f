"""Model FLOPs per training sample, from the shapes and the trainable set (for TFLOP/s, MFU and
the planner's time estimate).

Matmul FLOPs only (2 per multiply-add). Each component costs its forward once; its backward
costs one more forward for activation gradients when anything *before* it trains (gradients must
flow through it), and one more for weight gradients when it trains itself. Attention's
score/value products have no weights: their backward is two forwards. A frozen ViT with nothing
trainable before it runs forward only (megavlm runs it without autograd).

  llm_token   = 2h(nd + 2gd) + 2ndh + 2h·f·(3 if gated else 2)     per layer; the output layer 2hV
  llm_attn    = 2·s·n·d per layer (causal: half of the 4·s·n·d of full attention)
  vit_token   = 2h·3h + 2h·h + 2h·f·2 per layer, attention 4·t·h per layer, patch embedding 2·3p²·h
  connector   = 2(h_v·h + h·h) per image token (MLP), 2(4h_v·h + h·h) (pixel shuffle MLP), 2 h_v·h (linear)
  raw patches 2·3p²·h per patch (Fuyu's projection; no vision encoder; ``images`` counts patches)
  Q-Former    per layer: 8q² + 4q·f per token and 4·(Q+L)·q attention per token over its Q queries +
              L text tokens; every cross_attention_freq-th layer the queries also cross-attend:
              4q² + 4·T·q per query and 4·h_v·q per image token (keys/values); + 2q·h per query
              (the projection into the LLM). Generation runs the queries alone; BLIP-2's stage 1
              (head: qformer) runs a query pass and a text pass (ITC), three joint passes (ITM:
              the pair, a hard negative text, a hard negative image) and one joint pass (ITG).
  resampler   per layer and latent: 2w·2i (q, out) + 2w·4w·2 (ReLU FFN, width w = h_v, inner
              i = heads·head_dim) + 4·(T+N)·i attention; 2w·2i per key (T image tokens + N latents)
  cross-attn  per block (before every interval-th layer) and text token: 2h·2h (q, out) +
              2h·f·(3 if gated else 2) (its MLP) + 4·m·h attention over the sample's m media
              tokens; 2·w·2h per media token (keys/values)
  contrastive (CLIP/SigLIP): the ViT, the text encoder as the LLM without its output layer
              (bidirectional attention costs twice the causal), the projections 2·E·(h_v + h) per pair
  recompute   (full activation recomputation) one more forward of every transformer layer whose
              weights train: hardware work, not model FLOPs, so MFU does not count it
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megavlm.config.model import ModelConfig

# Dense bf16 peak TFLOP/s by device-name fragment (SXM parts).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


@dataclass
class FlopsBreakdown:
    vision: float
    connector: float
    llm: float            # the decoder layers
    fusion: float = 0.0   # Flamingo's cross-attention blocks among them
    head: float = 0.0     # the output layer

    @property
    def total(self) -> float:
        return self.vision + self.connector + self.llm + self.fusion + self.head


def _multiplier(trainable: bool, grads_flow_in: bool) -> float:
    return 1.0 + (1.0 if grads_flow_in else 0.0) + (1.0 if trainable else 0.0)


def _attention_multiplier(trainable: bool, grads_flow_in: bool) -> float:
    """Weight-free products: their backward is two forwards whenever any gradient passes."""
    return 3.0 if (trainable or grads_flow_in) else 1.0


def _vit_flops(cfg: ModelConfig, images: float, trainable: bool) -> float:
    v = cfg.vision
    tokens = v.num_patches + (1 if v.class_token else 0)
    hv = v.hidden_size
    per_token = v.layers_to_build * (2 * hv * 3 * hv + 2 * hv * hv + 2 * hv * v.ffn_hidden_size * 2)
    patch = 2 * 3 * v.patch_size**2 * hv
    attention = v.layers_to_build * 4 * tokens * hv
    return images * tokens * ((per_token + patch) * _multiplier(trainable, False)
                              + attention * _attention_multiplier(trainable, False))


def _qformer_pass(cfg: ModelConfig, queries: int, text: int, cross: bool) -> tuple[float, float]:
    """(weight FLOPs, attention FLOPs) of one Q-Former forward over ``queries`` + ``text`` tokens."""
    q = cfg.qformer
    hq, tokens = q.hidden_size, queries + text
    image_tokens = cfg.vision.num_patches + (1 if cfg.vision.class_token else 0)
    weights = q.num_layers * tokens * (8 * hq * hq + 4 * hq * q.ffn_hidden_size)
    attention = q.num_layers * tokens * 4 * tokens * hq
    cross_layers = len(range(0, q.num_layers, q.cross_attention_freq)) if cross and queries else 0
    weights += cross_layers * (queries * 4 * hq * hq + image_tokens * 4 * cfg.vision.hidden_size * hq)
    attention += cross_layers * queries * 4 * image_tokens * hq
    return weights, attention


def _qformer_flops(cfg: ModelConfig, images: float, text: int, trainable: bool, grads_in: bool) -> float:
    q = cfg.qformer
    queries = q.num_query_tokens
    if cfg.head == "qformer":
        passes = [(queries, 0, True), (0, text, False)] + [(queries, text, True)] * 4
    else:
        passes = [(queries, 0, True)]
    weights = attention = 0.0
    for pass_queries, pass_text, cross in passes:
        w, a = _qformer_pass(cfg, pass_queries, pass_text, cross)
        weights, attention = weights + w, attention + a
    if cfg.head == "lm":
        weights += queries * 2 * q.hidden_size * cfg.language.hidden_size
    return images * (weights * _multiplier(trainable, grads_in) + attention * _attention_multiplier(trainable, grads_in))


def _resampler_flops(cfg: ModelConfig, images: float, trainable: bool, grads_in: bool) -> float:
    f, v = cfg.flamingo, cfg.vision
    if not f.use_resampler:
        return 0.0
    w, inner, latents = v.hidden_size, f.resampler_built_heads * f.resampler_head_dim, f.num_latents
    keys = v.num_patches + (1 if v.class_token else 0) + latents
    weights = f.resampler_depth * (latents * (2 * w * 2 * inner + 2 * w * f.resampler_ffn_mult * w * 2)
                                   + keys * 2 * w * 2 * inner)
    attention = f.resampler_depth * latents * 4 * keys * inner
    return images * (weights * _multiplier(trainable, grads_in) + attention * _attention_multiplier(trainable, grads_in))


def _connector_flops(cfg: ModelConfig, images: float, text: int, trainable: bool, grads_in: bool) -> float:
    kind, hv, h = cfg.connector.type, cfg.vision.hidden_size, cfg.language.hidden_size
    if kind == "qformer":
        return _qformer_flops(cfg, images, text, trainable, grads_in)
    if kind == "perceiver":
        return _resampler_flops(cfg, images, trainable, grads_in)
    per_token = {"mlp2x_gelu": 2 * (hv * h + h * h), "pixel_shuffle_mlp": 2 * (4 * hv * h + h * h)}.get(kind, 2 * hv * h)
    return images * cfg.image_tokens * per_token * _multiplier(trainable, grads_in)  # per LLM image token


def _fusion_flops(cfg: ModelConfig, seq_length: int, images: float, trainable: bool, grads_in: bool) -> float:
    """Flamingo's gated cross-attention blocks (every media token of the sample is a key)."""
    if cfg.flamingo is None:
        return 0.0
    lang = cfg.language
    h, gated = lang.hidden_size, 3 if lang.gated else 2
    blocks = lang.num_layers // cfg.flamingo.cross_attention_interval
    media = images * cfg.media_tokens
    weights = blocks * (seq_length * (4 * h * h + 2 * h * lang.ffn_hidden_size * gated) + media * 4 * cfg.vision.hidden_size * h)
    attention = blocks * seq_length * 4 * media * h
    return weights * _multiplier(trainable, grads_in) + attention * _attention_multiplier(trainable, grads_in)


def _llm_flops(cfg: ModelConfig, seq_length: int, trainable: bool, grads_in: bool) -> tuple[float, float]:
    """(decoder layers, output layer) FLOPs of one sample."""
    lang = cfg.language
    h, f, n, g, d = lang.hidden_size, lang.ffn_hidden_size, lang.num_heads, lang.query_groups, lang.head_dim
    gated = 3 if lang.gated else 2
    per_token = lang.num_layers * (2 * h * (n * d + 2 * g * d) + 2 * n * d * h + 2 * h * f * gated)
    attention = lang.num_layers * 2 * seq_length * n * d
    layers = seq_length * (per_token * _multiplier(trainable, grads_in) + attention * _attention_multiplier(trainable, grads_in))
    return layers, seq_length * 2 * h * lang.vocab_size * _multiplier(trainable, grads_in)


def sample_flops(cfg: ModelConfig, seq_length: int, images: float, trainable: set[str]) -> FlopsBreakdown:
    """Training FLOPs of one sample of ``seq_length`` tokens carrying ``images`` images (or patches; BLIP-2's
    stage 1: ``seq_length`` text tokens for the Q-Former, no LLM)."""
    vis_train, conn_train, fusion_train = "vision" in trainable, "connector" in trainable, "fusion" in trainable
    if cfg.vision is None:   # raw patches: one projection per patch, straight into the decoder
        connector = images * 2 * cfg.patches.patch_dim * cfg.language.hidden_size * _multiplier(conn_train, False)
        layers, head = _llm_flops(cfg, seq_length, "llm" in trainable, conn_train or "lora" in trainable)
        return FlopsBreakdown(0.0, connector, layers, 0.0, head)
    vision = _vit_flops(cfg, images, vis_train)
    if cfg.head == "contrastive":
        return _contrastive(cfg, seq_length, images, trainable, vision)
    connector = _connector_flops(cfg, images, seq_length, conn_train, vis_train)
    if cfg.head == "qformer":
        return FlopsBreakdown(vision, connector, 0.0)
    image_side_trains = vis_train or conn_train
    fusion = _fusion_flops(cfg, seq_length, images, fusion_train, image_side_trains)
    # LLM layers sit after the fusion blocks they hold, and LoRA adapters sit in every layer:
    # gradients pass through the whole decoder whenever any of them trains
    grads_in = image_side_trains or fusion_train or "lora" in trainable
    layers, head = _llm_flops(cfg, seq_length, "llm" in trainable, grads_in)
    return FlopsBreakdown(vision, connector, layers, fusion, head)


def _contrastive(cfg: ModelConfig, seq_length: int, images: float, trainable: set[str], vision: float) -> FlopsBreakdown:
    """A CLIP/SigLIP pair: the ViT, the text encoder and the projections (reported as the connector)."""
    text_train, embed = "text" in trainable, cfg.contrastive.embed_dim
    causal_layers, _ = _llm_flops(cfg, seq_length, text_train, False)
    if not cfg.contrastive.causal_text:   # full attention: the score/value products of the causal count, twice
        lang = cfg.language
        attention = lang.num_layers * 2 * seq_length * lang.num_heads * lang.head_dim
        causal_layers += seq_length * attention * _attention_multiplier(text_train, False)
    projections = 2 * embed * (images * cfg.vision.hidden_size + cfg.language.hidden_size)
    return FlopsBreakdown(vision, projections * _multiplier("connector" in trainable, True), causal_layers)


def recompute_flops(cfg: ModelConfig, seq_length: int, images: float, trainable: set[str]) -> FlopsBreakdown:
    """The extra forward that full recomputation runs: the ViT's layers when the ViT trains, the
    decoder's (with their cross-attention blocks) when anything in it trains. Frozen parts run in
    eval mode, where megatron-core does not recompute."""
    forward_only = sample_flops(cfg, seq_length, images, set())
    decoder_trains = bool({"llm", "lora", "fusion"} & trainable) and cfg.head == "lm"
    vision = forward_only.vision if "vision" in trainable else 0.0
    return FlopsBreakdown(vision, 0.0, forward_only.llm if decoder_trains else 0.0,
                          forward_only.fusion if decoder_trains else 0.0)


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of the device, or None when unknown (CPU)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, tflops in PEAK_TFLOPS.items():
        if fragment in name:
            return tflops * 1e12
    return None


def batch_flops(cfg: ModelConfig, lengths: list[int], images: list[int], trainable: set[str]) -> float:
    """Training FLOPs of samples of the given real lengths and image counts: attention is counted
    per sample (what packed rows compute), and padding not at all."""
    return sum(sample_flops(cfg, length, n, trainable).total for length, n in zip(lengths, images))
