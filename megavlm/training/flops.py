"""Model FLOPs per training sample, from the shapes and the trainable set (for TFLOP/s and MFU).

Matmul FLOPs only (2 per multiply-add). Each component costs its forward once; its backward
costs one more forward for activation gradients when anything *before* it trains (gradients must
flow through it), and one more for weight gradients when it trains itself. Attention's
score/value products have no weights: their backward is two forwards. A frozen ViT with nothing
trainable before it runs forward only (megavlm runs it without autograd).

  llm_token   = 2h(nd + 2gd) + 2ndh + 2h·f·(3 if gated else 2)     per layer, + 2hV for the output layer
  llm_attn    = 2·s·n·d per layer (causal: half of the 4·s·n·d of full attention)
  vit_token   = 2h·3h + 2h·h + 2h·f·2 per layer, attention 4·t·h per layer, patch embedding 2·3p²·h
  connector   = 2(h_v·h + h·h) per image token (MLP), 2(4h_v·h + h·h) (pixel shuffle MLP), 2 h_v·h (linear)
  raw patches = 2·3p²·h per patch (Fuyu's projection; no vision encoder; ``images`` counts patches)
  (Flamingo's resampler and cross-attention and BLIP-2's Q-Former are not counted yet.)
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
    llm: float

    @property
    def total(self) -> float:
        return self.vision + self.connector + self.llm


def _multiplier(trainable: bool, grads_flow_in: bool) -> float:
    return 1.0 + (1.0 if grads_flow_in else 0.0) + (1.0 if trainable else 0.0)


def sample_flops(cfg: ModelConfig, seq_length: int, images: float, trainable: set[str]) -> FlopsBreakdown:
    """Training FLOPs of one sample of ``seq_length`` tokens carrying ``images`` images (or patches)."""
    v, lang = cfg.vision, cfg.language
    h, f, n, g, d = lang.hidden_size, lang.ffn_hidden_size, lang.num_heads, lang.query_groups, lang.head_dim
    gated = 3 if lang.gated else 2
    llm_token = lang.num_layers * (2 * h * (n * d + 2 * g * d) + 2 * n * d * h + 2 * h * f * gated) + 2 * h * lang.vocab_size
    llm_attn = lang.num_layers * 2 * seq_length * n * d
    conn_train, llm_train = "connector" in trainable, bool({"llm", "lora", "fusion"} & trainable)
    if v is None:   # raw patches: one projection per patch, straight into the decoder
        connector = images * 2 * cfg.patches.patch_dim * h * _multiplier(conn_train, False)
        llm = seq_length * llm_token * _multiplier(llm_train, conn_train)
        llm += seq_length * llm_attn * (1.0 + (2.0 if (llm_train or conn_train) else 0.0))
        return FlopsBreakdown(0.0, connector, llm)
    vision_tokens = v.num_patches + (1 if v.class_token else 0)
    hv = v.hidden_size
    vit_token = v.layers_to_build * (2 * hv * 3 * hv + 2 * hv * hv + 2 * hv * v.ffn_hidden_size * 2)
    vit_attn = v.layers_to_build * 4 * vision_tokens * hv
    patch = 2 * 3 * v.patch_size**2 * hv
    conn_token = {"mlp2x_gelu": 2 * (hv * h + h * h), "pixel_shuffle_mlp": 2 * (4 * hv * h + h * h)}.get(
        cfg.connector.type, 2 * hv * h)  # per LLM image token; the pixel shuffle packs 4 ViT tokens into one

    vis_train = "vision" in trainable
    vision = images * (vision_tokens * (vit_token + patch) + vision_tokens * vit_attn) * _multiplier(vis_train, False)
    if vis_train:
        vision += images * vision_tokens * vit_attn  # attention's backward is two forwards
    connector = images * cfg.image_tokens * conn_token * _multiplier(conn_train, vis_train)
    llm_grads_in = vis_train or conn_train
    llm = seq_length * llm_token * _multiplier(llm_train, llm_grads_in)
    attn_backward = 2.0 if (llm_train or llm_grads_in) else 0.0
    llm += seq_length * llm_attn * (1.0 + attn_backward)
    return FlopsBreakdown(vision, connector, llm)


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
