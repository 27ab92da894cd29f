"""Activation bytes one micro-batch keeps for its backward, per layer type, from the shapes.

Every term is a tensor autograd saves in megavlm's local layers (the transformer engine
layers save the same tensors, fused); ``e`` is the bytes of the training dtype, norm statistics
and the loss's softmax are fp32. Per token of a transformer layer (hidden h, heads n, key/value
heads g, head size d, FFN width f; T = tensor-parallel size, S = T with sequence parallelism
else 1):

  norms       2 x (h·e + stats) / S          stats: 4 (RMSNorm) or 8 (LayerNorm) bytes;
                                              + h·e each for an RMSNorm whose weight trains
  linears     2h·e / S (the QKV and FC1 inputs), only when the layer's weights train: the
              weight gradients need them (a frozen weight saves none)
  attention   ((n + 2g)·d [the QKV output] + (n + g)·d [q, k after RoPE] + n·d [output])·e / T
              + 4n/T [log-sum-exp]; flash-style attention keeps no s x s scores
  QK-norm     InternViT: (2n·d·e, + 2n·d·e when its weight trains, + 8) / T
  LayerScale  InternViT: 2h·e / S when the scales train
  MLP         SwiGLU / GeGLU 4f·e/T, GELU f·e/T, quick-GELU 2f·e/T, ReLU f·e/T, squared ReLU
              2f·e/T; + f·e/T (the FC2 input) when the weights train (ReLU: already counted)
  recompute   full: only each layer's input, h·e / S, is kept; one layer's tensors are rebuilt
              at a time in the backward (the estimate's ``working_set``). Only layers whose
              weights train recompute: a frozen one runs in eval mode, where megatron-core does not

A frozen part with nothing trainable before it runs without autograd and keeps nothing. The
output layer keeps its input (h·e, weights training) and the fp32 logits' softmax (4V/T per
token) unless the fused linear cross-entropy is on. A ViT keeps its pixels (3p²·e per patch)
when its patch embedding trains.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from megavlm.config.model import ModelConfig

# (bytes per FFN element saved by the activation, FC2 input extra when the weights train)
_MLP_SAVES = {"swiglu": (4, 1), "geglu": (4, 1), "gelu": (1, 1), "gelu_tanh": (1, 1), "quick_gelu": (2, 1),
              "relu": (1, 0), "squared_relu": (2, 1)}
_NORM_STATS = {"RMSNorm": 4, "LayerNorm": 8}


@dataclass(frozen=True)
class LayerShape:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    activation: str
    normalization: str
    rope: bool
    qk_norm: bool = False       # InternViT: full-width RMSNorm on q and k
    layer_scale: bool = False   # InternViT: learned per-channel scales on both residual branches


@dataclass(frozen=True)
class Placement:
    tp: int = 1
    sequence_parallel: bool = False
    dtype_bytes: int = 2
    recompute: str = "off"          # off | selective | full

    @property
    def seq_split(self) -> int:
        return self.tp if self.sequence_parallel else 1


@dataclass
class ActivationEstimate:
    terms: dict[str, float] = field(default_factory=dict)   # name -> bytes per micro-batch
    working_set: float = 0.0                                # full recompute: one layer rebuilt

    @property
    def total(self) -> float:
        return sum(self.terms.values()) + self.working_set


def _norm_bytes(shape: LayerShape, at: Placement, weight_trains: bool) -> float:
    e = at.dtype_bytes
    extra = shape.hidden * e if (shape.normalization == "RMSNorm" and weight_trains) else 0
    return (shape.hidden * e + _NORM_STATS[shape.normalization] + extra) / at.seq_split


def layer_bytes_per_token(shape: LayerShape, at: Placement, weights_train: bool) -> float:
    """Bytes one token keeps in one transformer layer that gradients pass through."""
    e, t = at.dtype_bytes, at.tp
    h, n, g, d, f = shape.hidden, shape.heads, shape.kv_heads, shape.head_dim, shape.ffn
    total = 2 * _norm_bytes(shape, at, weights_train)
    if weights_train:
        total += 2 * h * e / at.seq_split
    total += ((n + 2 * g) * d + ((n + g) * d if shape.rope else 0) + n * d) * e / t + 4 * n / t
    act, fc2 = _MLP_SAVES[shape.activation]
    total += (act + (fc2 if weights_train else 0)) * f * e / t
    if shape.qk_norm:   # q and k, each normalised over all heads' channels
        total += 2 * (n * d * e * (2 if weights_train else 1) + 4) / t
    if shape.layer_scale and weights_train:   # the scales' gradients need both branches' outputs
        total += 2 * h * e / at.seq_split
    return total


def layer_bytes(shape: LayerShape, at: Placement, tokens: int, weights_train: bool, rope_positions: int = 0) -> float:
    """Bytes of one layer for ``tokens`` tokens, as the recompute setting keeps them."""
    if at.recompute == "full":
        return tokens * shape.hidden * at.dtype_bytes / at.seq_split
    rope = 4 * rope_positions * shape.head_dim * at.dtype_bytes if shape.rope else 0   # cos and sin of q and k
    return tokens * layer_bytes_per_token(shape, at, weights_train) + rope


def _rebuilt(shape: LayerShape, at: Placement, tokens: int, weights_train: bool, rope_positions: int) -> float:
    """Full recompute: the tensors of the one layer rebuilt during the backward."""
    if at.recompute != "full":
        return 0.0
    live = Placement(at.tp, at.sequence_parallel, at.dtype_bytes, "off")
    return layer_bytes(shape, live, tokens, weights_train, rope_positions)


def language_shape(cfg: ModelConfig) -> LayerShape:
    lang = cfg.language
    return LayerShape(lang.hidden_size, lang.num_heads, lang.num_kv_heads, lang.head_dim, lang.ffn_hidden_size,
                      lang.activation, lang.normalization, lang.position_embedding == "rope")


def vision_shape(cfg: ModelConfig) -> LayerShape:
    v = cfg.vision
    return LayerShape(v.hidden_size, v.built_heads, v.built_heads, v.hidden_size // v.num_heads, v.ffn_hidden_size,
                      v.activation, v.normalization, False, v.qk_norm, v.layer_scale is not None)


def _side_shape(hidden: int, heads: int, head_dim: int, ffn: int, activation: str) -> LayerShape:
    return LayerShape(hidden, heads, heads, head_dim, ffn, activation, "LayerNorm", False)


def _connector_bytes(cfg: ModelConfig, at: Placement, images: int, trains: bool, grads_pass: bool) -> float:
    """The connector's tensors per micro-batch. The Q-Former and the resampler are counted as
    transformer layers over their queries/latents (+ the image tokens they attend to as keys)."""
    if not (trains or grads_pass):
        return 0.0
    if cfg.vision is None:   # raw patches (``images`` counts them): the projection keeps its input to train
        return images * cfg.patches.patch_dim * at.dtype_bytes if trains else 0.0
    e, v, h = at.dtype_bytes, cfg.vision, cfg.language.hidden_size
    vit_tokens = v.num_patches + (1 if v.class_token else 0)
    kind = cfg.connector.type
    whole = Placement(1, False, e, "off") if cfg.connector.tensor_parallel == 1 else Placement(at.tp, False, e, "off")
    if kind == "qformer":
        q = cfg.qformer
        shape = _side_shape(q.hidden_size, q.built_heads, q.head_dim, q.ffn_hidden_size, "gelu")
        cross = len(range(0, q.num_layers, q.cross_attention_freq))
        keys = cross * vit_tokens * (v.hidden_size + 2 * q.hidden_size / whole.tp) * e
        return images * (q.num_layers * layer_bytes(shape, whole, q.num_query_tokens, trains) + keys)
    if kind == "perceiver":
        f = cfg.flamingo
        if not f.use_resampler:
            return 0.0
        inner = f.resampler_built_heads * f.resampler_head_dim
        shape = _side_shape(v.hidden_size, f.resampler_built_heads, f.resampler_head_dim,
                            f.resampler_ffn_mult * v.hidden_size, "relu")
        keys = (vit_tokens + f.num_latents) * (v.hidden_size + 2 * inner / whole.tp) * e
        return images * f.resampler_depth * (layer_bytes(shape, whole, f.num_latents, trains) + keys)
    width_in = 4 * v.hidden_size if kind == "pixel_shuffle_mlp" else v.hidden_size
    per_token = (width_in + 2 * h) * e if trains else h * e
    return images * cfg.image_tokens * per_token


def _fusion_bytes(cfg: ModelConfig, at: Placement, tokens: int, images: int, layers: int, trains: bool) -> float:
    """Flamingo's gated cross-attention blocks among ``layers`` LLM layers."""
    if cfg.flamingo is None:
        return 0.0
    blocks = -(-layers // cfg.flamingo.cross_attention_interval)
    shape = language_shape(cfg)
    media = images * cfg.media_tokens * (cfg.vision.hidden_size + 2 * shape.hidden / at.tp) * at.dtype_bytes
    return blocks * (layer_bytes(shape, at, tokens, trains) + media)


def activation_estimate(cfg: ModelConfig, trainable: set[str], micro_batch: int, seq_length: int,
                        images_per_sample: float, at: Placement, llm_layers: int, first_stage: bool = True,
                        last_stage: bool = True) -> ActivationEstimate:
    """Bytes one micro-batch keeps on a pipeline stage holding ``llm_layers`` decoder layers."""
    out = ActivationEstimate()
    e, v = at.dtype_bytes, cfg.vision
    images = round(micro_batch * images_per_sample)
    tokens = micro_batch * seq_length
    vis_train, conn_train = "vision" in trainable, "connector" in trainable
    # a contrastive model's text encoder ("text") stands where a VLM's decoder does
    llm_train, fusion_train = bool({"llm", "lora", "text"} & trainable), "fusion" in trainable
    if first_stage and vis_train:
        vit_tokens = images * (v.num_patches + (1 if v.class_token else 0))
        shape = vision_shape(cfg)
        vision_at = Placement(1, False, e, at.recompute) if v.tensor_parallel == 1 else at
        out.terms["vision layers"] = v.layers_to_build * layer_bytes(shape, vision_at, vit_tokens, True)
        out.terms["vision patches + norms"] = images * v.num_patches * 3 * v.patch_size**2 * e + vit_tokens * (
            v.hidden_size * e + 8) * (int(v.pre_norm) + int(v.post_norm))
        out.working_set = max(out.working_set, _rebuilt(shape, vision_at, vit_tokens, True, 0))
    if first_stage:
        out.terms["connector"] = _connector_bytes(cfg, at, images, conn_train, vis_train)
    if cfg.head == "qformer":
        return out
    grads_pass = vis_train or conn_train or fusion_train or llm_train
    if grads_pass:
        shape = language_shape(cfg)
        # a frozen decoder runs in eval mode, where megatron-core does not recompute
        llm_at = at if llm_train else dataclasses.replace(at, recompute="off")
        out.terms["decoder layers"] = llm_layers * layer_bytes(shape, llm_at, tokens, llm_train, seq_length)
        out.terms["cross-attention blocks"] = _fusion_bytes(cfg, llm_at, tokens, images, llm_layers, fusion_train)
        out.working_set = max(out.working_set, _rebuilt(shape, llm_at, tokens, llm_train, seq_length))
    if last_stage and grads_pass and cfg.head == "lm":   # a contrastive model has no output layer
        lang = cfg.language
        head = _norm_bytes(language_shape(cfg), at, llm_train) * tokens
        head += tokens * lang.hidden_size * e if llm_train else 0
        if not cfg.kernels.fused_linear_cross_entropy:
            head += tokens * 4 * lang.vocab_size / at.tp
        out.terms["final norm + output layer + loss"] = head
    out.terms = {k: v for k, v in out.terms.items() if v}
    return out


def in_flight_micro_batches(pp: int, pp_rank: int, micro_batches: int) -> int:
    """1F1B: stage k holds the activations of up to pp - k micro-batches at once."""
    return max(1, min(pp - pp_rank, micro_batches))
