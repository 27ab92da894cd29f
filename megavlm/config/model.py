"""Model configs: a vision encoder, a connector and a language model, composed per family."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from megavlm.config.schema import check


@dataclass
class VisionConfig:
    """A ViT encoder (CLIP ViT-L/14-336 by default)."""

    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    ffn_hidden_size: int = 4096
    # MLP activation (CLIP: quick_gelu; SigLIP: gelu_tanh)
    activation: Literal["quick_gelu", "gelu", "gelu_tanh"] = "quick_gelu"
    norm_eps: float = 1e-5
    class_token: bool = True
    pre_norm: bool = True          # CLIP's ln_pre before the first layer
    patch_bias: bool = False
    # Features are taken from this hidden state, HF-style: 0 = embeddings, -1 = last layer,
    # -2 = second-to-last (LLaVA). Only the layers up to it are built and run.
    feature_layer: int = -2
    keep_class_token: bool = False  # LLaVA's "default" select strategy drops it
    post_norm: bool = False         # a final LayerNorm on the features (BLIP-2's ViT)
    normalization: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    # InternViT: RMSNorm over all heads' q (and k) channels, and LayerScale (a learned per-channel
    # scale on the attention and MLP outputs, initialised to this value; None: no LayerScale).
    qk_norm: bool = False
    layer_scale: Optional[float] = None
    qkv_bias: bool = True           # False: bias-free q/k/v (InternViT-6B); the other linears keep theirs
    # None: split over the LLM's tensor-parallel ranks. 1: whole on every TP rank (any head count),
    # with its own size-1 TP group, while the LLM is split.
    tensor_parallel: Optional[int] = None
    # Megatron-LM's answer to head counts TP does not divide (InternViT-6B's 25): the converter adds
    # zero-weight dummy heads up to this count (their output projection columns are zero, the
    # full-width QK-norm ignores them) and strips them on export. None: no padding.
    padded_heads: Optional[int] = None

    def __post_init__(self):
        check(self.padded_heads is None or self.padded_heads >= self.num_heads, "vision.padded_heads",
              f"{self.padded_heads} is fewer than num_heads {self.num_heads}")
        # A remainder is allowed: the patch convolution drops the last pixels, as HF's does
        # (SigLIP-so400m reads 384 px in 27 patches of 14).
        check(self.image_size >= self.patch_size, "vision.image_size",
              f"{self.image_size} is smaller than patch_size {self.patch_size}")
        check(self.hidden_size % self.num_heads == 0, "vision.num_heads",
              f"hidden_size {self.hidden_size} is not divisible by {self.num_heads} heads")
        check(-self.num_layers - 1 <= self.feature_layer <= self.num_layers, "vision.feature_layer",
              f"{self.feature_layer} is outside [-{self.num_layers + 1}, {self.num_layers}]")
        check(self.layers_to_build >= 1, "vision.feature_layer", "selects the embeddings; at least one layer is needed")
        check(not self.keep_class_token or self.class_token, "vision.keep_class_token",
              "needs class_token: true")
        check(self.tensor_parallel in (None, 1), "vision.tensor_parallel",
              f"{self.tensor_parallel}: the vision tower is split like the LLM (null) or whole on every rank (1)")

    @property
    def built_heads(self) -> int:
        """Heads the model has: the real ones and any dummy heads."""
        return self.padded_heads or self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def layers_to_build(self) -> int:
        layer = self.feature_layer
        return self.num_layers + 1 + layer if layer < 0 else layer

    @property
    def tokens_per_image(self) -> int:
        return self.num_patches + (1 if self.keep_class_token else 0)


@dataclass
class LanguageConfig:
    """A decoder-only LLM (Llama-style by default), or the text encoder of a contrastive model
    (family clip: learned positions, causal or bidirectional per ``contrastive.causal_text``)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: Optional[int] = None   # None: multi-head attention
    ffn_hidden_size: int = 11008
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    # swiglu: SiLU-gated (Llama); geglu: tanh-GELU-gated (Gemma); squared_relu: relu(x)^2 (Persimmon);
    # quick_gelu (CLIP text), gelu_tanh (SigLIP text)
    activation: Literal["swiglu", "geglu", "gelu", "relu", "squared_relu", "quick_gelu", "gelu_tanh"] = "swiglu"
    position_embedding: Literal["rope", "learned"] = "rope"
    rotary_percent: float = 1.0          # share of each head's channels RoPE rotates (Persimmon: 0.5)
    qkv_bias: bool = False
    linear_bias: bool = False
    tie_embeddings: bool = False
    # Channels per attention head; None: hidden_size / num_heads (Gemma-7B: 256 with 16 heads of a 3072 model)
    kv_channels: Optional[int] = None
    qk_norm: bool = False                # a LayerNorm over each head's query and key channels (Persimmon)
    scale_embeddings: bool = False       # token embeddings times sqrt(hidden_size) (Gemma); image embeddings not
    # Norms scale by (1 + weight), their weights start at 0 (Gemma); checkpoints hold that weight
    zero_centered_norm: bool = False

    def __post_init__(self):
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        check(self.kv_channels is not None or self.hidden_size % self.num_heads == 0, "language.num_heads",
              f"hidden_size {self.hidden_size} is not divisible by {self.num_heads} heads "
              f"(or set language.kv_channels)")
        check(self.kv_channels is None or self.kv_channels > 0, "language.kv_channels", "must be positive")
        check(self.num_heads % self.query_groups == 0, "language.num_kv_heads",
              f"{self.num_heads} heads are not divisible by {self.query_groups} KV heads")
        check(0 < self.rotary_percent <= 1, "language.rotary_percent", "must be in (0, 1]")
        rotary = int(self.head_dim * self.rotary_percent)
        check(self.position_embedding != "rope" or (rotary % 2 == 0 and rotary > 0), "language.rotary_percent",
              f"rotates {self.head_dim} x {self.rotary_percent} channels per head: needs an even, positive count")

    @property
    def query_groups(self) -> int:
        return self.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_heads

    @property
    def gated(self) -> bool:
        """The MLP's first projection holds [gate; up] halves."""
        return self.activation in ("swiglu", "geglu")


@dataclass
class ConnectorConfig:
    """Maps vision features to LLM embeddings."""

    # pixel_shuffle_mlp: InternVL's pixel shuffle (ratio 0.5) + LayerNorm + 2-layer GELU MLP
    type: Literal["mlp2x_gelu", "linear", "qformer", "perceiver", "pixel_shuffle_mlp"] = "mlp2x_gelu"
    bias: bool = True
    # The Q-Former / Perceiver resampler: None: split over the LLM's TP ranks; 1: whole on every
    # TP rank (any head count) with its own size-1 TP group
    tensor_parallel: Optional[int] = None

    def __post_init__(self):
        check(self.tensor_parallel in (None, 1), "connector.tensor_parallel",
              f"{self.tensor_parallel}: the connector is split like the LLM (null) or whole on every rank (1)")


@dataclass
class QFormerConfig:
    """BLIP-2's querying transformer: BERT-style post-LN layers over learned queries (and text),
    cross-attending to the image features every ``cross_attention_freq`` layers."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    ffn_hidden_size: int = 3072
    num_query_tokens: int = 32
    # Zero dummy heads up to this count (as vision.padded_heads) in the self- and cross-attention
    padded_heads: Optional[int] = None
    cross_attention_freq: int = 2
    vocab_size: int = 30523
    max_position_embeddings: int = 512
    norm_eps: float = 1e-12
    embed_dim: int = 256            # ITC projection size
    dec_token_id: int = 1           # the [DEC] token that starts ITG's text (BERT's added bos)
    text_input: bool = True         # text embeddings and text FFNs (ITC/ITM/ITG); generation alone needs none

    def __post_init__(self):
        check(self.hidden_size % self.num_heads == 0, "qformer.num_heads",
              f"hidden_size {self.hidden_size} is not divisible by {self.num_heads} heads")
        check(self.cross_attention_freq >= 1, "qformer.cross_attention_freq", "must be >= 1")
        check(self.padded_heads is None or self.padded_heads >= self.num_heads, "qformer.padded_heads",
              f"{self.padded_heads} is fewer than num_heads {self.num_heads}")

    @property
    def built_heads(self) -> int:
        return self.padded_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class FlamingoConfig:
    """Flamingo / IDEFICS: a Perceiver resampler turns each image's ViT features into
    ``num_latents`` latents; gated cross-attention blocks, inserted before every
    ``cross_attention_interval``-th LLM layer, let text tokens attend to them."""

    num_latents: int = 64
    resampler_depth: int = 6
    resampler_heads: int = 16
    resampler_head_dim: int = 96
    resampler_ffn_mult: int = 4        # resampler FFN width = mult x vision hidden size
    resampler_padded_heads: Optional[int] = None  # zero dummy heads up to this count (as vision.padded_heads)
    max_frames: int = 1                # > 1: learned frame embeddings; a media item is [frames, 3, H, W]
    cross_attention_interval: int = 4  # a gated block before LLM layer i when i % interval == 0 (IDEFICS)
    # Which images a text token sees: the most recent preceding one (Flamingo), or all preceding.
    media_attention: Literal["most_recent", "all_previous"] = "most_recent"
    max_media: int = 5                 # images per sample; pipeline stages send this many latent sets
    gate_type: Literal["float", "vector"] = "float"   # one tanh gate per block, or one per channel
    gate_init: float = 0.0             # tanh(0) = 0: the frozen LLM's outputs are unchanged at the start
    hf_additional_vocab: int = 0       # IDEFICS holds the last N vocabulary rows in separate tensors
    # False: no resampler; text attends to every ViT token of an image (IDEFICS' use_resampler: false)
    use_resampler: bool = True

    def __post_init__(self):
        for key in ("num_latents", "resampler_depth", "resampler_heads", "resampler_head_dim", "resampler_ffn_mult",
                    "max_frames", "cross_attention_interval", "max_media"):
            check(getattr(self, key) >= 1, f"flamingo.{key}", "must be >= 1")
        check(self.hf_additional_vocab >= 0, "flamingo.hf_additional_vocab", "must be >= 0")
        check(self.use_resampler or self.max_frames == 1, "flamingo.max_frames",
              "multi-frame media are pooled by the resampler: set use_resampler: true")
        check(self.resampler_padded_heads is None or self.resampler_padded_heads >= self.resampler_heads,
              "flamingo.resampler_padded_heads", f"{self.resampler_padded_heads} is fewer than resampler_heads "
              f"{self.resampler_heads}")

    @property
    def resampler_built_heads(self) -> int:
        return self.resampler_padded_heads or self.resampler_heads


@dataclass
class ContrastiveConfig:
    """Two-tower image-text pre-training (CLIP, SigLIP): the ViT (``vision``) and a text transformer
    (``language``) are each pooled to one vector, projected into a shared space and trained to
    match each image with its text against every other pair of the micro-batches of all
    data-parallel ranks (embeddings gathered with gradients)."""

    # clip: InfoNCE, image->text and text->image; siglip: a sigmoid per image-text pair (learned bias)
    loss: Literal["clip", "siglip"] = "clip"
    embed_dim: int = 768                 # size of the shared space both towers project into
    # class_token: CLIP's normalised class token; attention: SigLIP's attention pooling (one
    # learned probe attends to every patch, then a residual MLP)
    image_pooling: Literal["class_token", "attention"] = "class_token"
    # eot: the last real token, which closes every text (CLIP, causal); last: the last position of
    # the padded row (SigLIP pads every text to language.max_seq_len); mean: the real tokens' mean
    text_pooling: Literal["eot", "last", "mean"] = "eot"
    causal_text: bool = True             # CLIP's text encoder is causal; SigLIP's is bidirectional
    image_projection: bool = True        # false: the pooled image is the embedding (SigLIP)
    text_projection_bias: bool = False   # SigLIP's text head has a bias, CLIP's projection none
    logit_scale_init: float = 2.6592     # log of the initial similarity scale (CLIP: ln(1/0.07); SigLIP: ln(10))
    logit_bias_init: Optional[float] = None   # the sigmoid loss's learned bias (SigLIP: -10); clip: null
    # the scale exp(logit_scale) is clamped to at most this, as CLIP does; null: never clamped
    max_logit_scale: Optional[float] = 100.0
    # the end-of-text token written to an exported HF config (HF's CLIP finds the pooled token by
    # it; megavlm pools the last real token, the same one for texts built as [bos] text [eot])
    eot_token_id: Optional[int] = None

    def __post_init__(self):
        check(self.embed_dim > 0, "contrastive.embed_dim", "must be positive")
        check((self.loss == "siglip") == (self.logit_bias_init is not None), "contrastive.logit_bias_init",
              "the sigmoid loss (loss: siglip) needs a logit bias, InfoNCE (loss: clip) has none")
        check(self.max_logit_scale is None or self.max_logit_scale > 1, "contrastive.max_logit_scale", "must be > 1")
        check(self.text_pooling != "eot" or self.causal_text, "contrastive.text_pooling",
              "eot pooling reads the end-of-text token of a causal encoder; a bidirectional one uses last or mean")


@dataclass
class PatchInputConfig:
    """Images enter the decoder as raw patches (Fuyu): no vision encoder. An image is scaled down
    (aspect kept) to fit max_height x max_width, padded at the bottom and right to a multiple of
    patch_size, and cut into patches in raster order; each row of patches is followed by the
    image-newline token. A patch is one decoder position, linearly projected from its pixels."""

    patch_size: int = 30
    max_height: int = 1080
    max_width: int = 1920
    # an id the tokenizer never produces for text (Fuyu-8B: 71019, |NEWLINE|)
    newline_token_id: int = 71019

    def __post_init__(self):
        check(self.patch_size > 0, "patches.patch_size", "must be positive")
        for key in ("max_height", "max_width"):
            check(getattr(self, key) >= self.patch_size, f"patches.{key}",
                  f"{getattr(self, key)} is smaller than patch_size {self.patch_size}")

    @property
    def patch_dim(self) -> int:
        """Inputs of the patch projection: 3 channels x patch_size^2 pixels."""
        return 3 * self.patch_size ** 2

    @property
    def max_patches(self) -> int:
        return (self.max_height // self.patch_size) * (self.max_width // self.patch_size)


@dataclass
class KernelConfig:
    """Fused implementations (kernels/); chosen in models/common/layer_specs.py only."""

    cross_entropy: Literal["torch", "triton"] = "torch"
    # Output layer + loss in one chunked op: the [tokens x vocab] logits are never materialised.
    fused_linear_cross_entropy: bool = False
    loss_chunk_tokens: int = 4096
    connector: Literal["torch", "triton"] = "torch"   # LLaVA's MLP projector

    def __post_init__(self):
        check(self.loss_chunk_tokens > 0, "kernels.loss_chunk_tokens", "must be positive")


# Families whose model takes ``prefix_lengths`` (models/common/vlm.py VLMBase with the LLaVA-style decoder)
PREFIX_LM_FAMILIES = ("llava", "internvl", "fuyu", "paligemma")


@dataclass
class ModelConfig:
    family: Literal["llava", "blip2", "flamingo", "internvl", "clip", "fuyu", "paligemma"] = "llava"
    flavor: str = ""
    # What the model computes: "lm" (next-token loss through the LLM), "qformer" (BLIP-2 stage 1:
    # ITC/ITM/ITG on the Q-Former, no LLM) or "contrastive" (CLIP / SigLIP: the ViT and a text
    # encoder, ``language``, trained to match image-text pairs).
    head: Literal["lm", "qformer", "contrastive"] = "lm"
    # The ViT encoder (CLIP ViT-L/14-336 by default); null: none, the images enter the decoder as
    # raw patches (a patches section: Fuyu)
    vision: Optional[VisionConfig] = field(default_factory=VisionConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    qformer: Optional[QFormerConfig] = None
    flamingo: Optional[FlamingoConfig] = None
    contrastive: Optional[ContrastiveConfig] = None
    patches: Optional[PatchInputConfig] = None
    image_token_id: int = 32000
    # Prefix-LM attention (PaliGemma): each sample's prefix (image + prompt, everything before
    # its first supervised token) attends bidirectionally, the rest causally
    prefix_lm: bool = False
    # Per-channel pixel normalisation (CLIP's by default; SigLIP and Fuyu: 0.5, 0.5)
    image_mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    image_std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    # Implementation of the transformer layers: chosen in models/common/layer_specs.py only.
    transformer_impl: Literal["local", "te"] = "local"
    # FP8 GEMMs in the transformer layers through Transformer Engine (E4M3 forward, E5M2 gradients):
    # "delayed" (amax history) or "current" (per-tensor current scaling); bf16 elsewhere.
    fp8: Optional[Literal["delayed", "current"]] = None
    kernels: KernelConfig = field(default_factory=KernelConfig)
    init_std: float = 0.02

    def __post_init__(self):
        check(self.fp8 is None or self.transformer_impl == "te", "fp8", "FP8 runs through Transformer Engine: "
              "set transformer_impl: te")
        check(self.head == "contrastive" or 0 <= self.image_token_id < self.language.vocab_size, "image_token_id",
              f"{self.image_token_id} is outside the vocabulary (size {self.language.vocab_size})")
        check((self.vision is None) == (self.patches is not None), "patches",
              "a model has a vision encoder (vision section) or raw patch inputs (patches section, vision: null), "
              "not both")
        if self.patches is not None:
            newline = self.patches.newline_token_id
            check(0 <= newline < self.language.vocab_size and newline != self.image_token_id,
                  "patches.newline_token_id", f"{newline} must be a vocabulary id other than image_token_id")
            check(self.connector.type == "linear" and self.qformer is None and self.flamingo is None,
                  "connector.type", "raw patches go through a linear projection: use connector.type: linear")
        check(len(self.image_mean) == 3 and len(self.image_std) == 3 and all(s > 0 for s in self.image_std),
              "image_mean", "image_mean and image_std need 3 channels (and a positive std)")
        check(not self.prefix_lm or self.family in PREFIX_LM_FAMILIES, "prefix_lm",
              f"the prefix-LM mask is built by the families that place image embeddings in the sequence "
              f"({', '.join(PREFIX_LM_FAMILIES)}), not {self.family}")
        check((self.connector.type == "qformer") == (self.qformer is not None), "qformer",
              "a qformer section goes with connector.type: qformer")
        check(self.head != "qformer" or self.qformer is not None, "head", "head: qformer needs a qformer section")
        check(self.head != "qformer" or self.connector.tensor_parallel is None, "connector.tensor_parallel",
              "BLIP-2 stage 1 (head: qformer) splits the Q-Former with the model: leave it null")
        check((self.connector.type == "perceiver") == (self.flamingo is not None), "flamingo",
              "a flamingo section goes with connector.type: perceiver")
        if self.flamingo is not None:
            interval = self.flamingo.cross_attention_interval
            check(self.language.num_layers % interval == 0, "flamingo.cross_attention_interval",
                  f"{interval} does not divide language.num_layers {self.language.num_layers}")
            check(self.flamingo.hf_additional_vocab < self.language.vocab_size, "flamingo.hf_additional_vocab",
                  "must be smaller than language.vocab_size")
        if self.contrastive is not None or self.head == "contrastive" or self.family == "clip":
            self._check_contrastive()
        if self.connector.type == "pixel_shuffle_mlp":
            side = self.vision.image_size // self.vision.patch_size
            check(side % 2 == 0 and not self.vision.keep_class_token, "connector.type",
                  f"pixel_shuffle_mlp needs an even grid of patch tokens without the class token (grid {side}x{side})")

    def _check_contrastive(self) -> None:
        c, vision = self.contrastive, self.vision
        check(self.family == "clip" and self.head == "contrastive" and c is not None, "head",
              "a contrastive section, head: contrastive and family: clip go together")
        check(vision.layers_to_build == vision.num_layers, "vision.feature_layer",
              "a contrastive image tower pools its last layer: use -1")
        check(self.language.position_embedding == "learned", "language.position_embedding",
              "the text encoder has learned absolute positions (CLIP, SigLIP)")
        if c.image_pooling == "class_token":
            check(vision.class_token and vision.keep_class_token, "vision.keep_class_token",
                  "class_token pooling reads the class token: set vision.class_token and keep_class_token")
        check(c.image_projection or c.embed_dim == vision.hidden_size, "contrastive.embed_dim",
              f"without an image projection the pooled image ({vision.hidden_size}) is the embedding")

    def attention_heads(self) -> list[tuple[str, str, int]]:
        """(config key, module, head count) of every attention tensor parallelism splits by heads."""
        heads = [] if self.vision is None or self.vision.tensor_parallel == 1 else [
            ("model.vision.padded_heads" if self.vision.padded_heads else "model.vision.num_heads",
             "the ViT's self-attention", self.vision.built_heads)]
        whole_connector = self.connector.tensor_parallel == 1
        if self.qformer is not None and not (whole_connector and self.head == "lm"):
            heads.append(("model.qformer.padded_heads" if self.qformer.padded_heads else "model.qformer.num_heads",
                          "the Q-Former's self- and cross-attention", self.qformer.built_heads))
        if self.flamingo is not None and self.flamingo.use_resampler and not whole_connector:
            f = self.flamingo
            heads.append(("model.flamingo.resampler_padded_heads" if f.resampler_padded_heads
                          else "model.flamingo.resampler_heads", "the Perceiver resampler's attention",
                          f.resampler_built_heads))
        if self.head == "contrastive":
            heads.append(("model.language.num_heads", "the text encoder's attention", self.language.num_heads))
            if self.contrastive.image_pooling == "attention" and self.vision.tensor_parallel != 1:
                heads.append(("model.vision.padded_heads" if self.vision.padded_heads else "model.vision.num_heads",
                              "the attention pooling of the image tower", self.vision.built_heads))
        if self.head == "lm":
            heads += [("model.language.num_heads", "the language model's attention", self.language.num_heads),
                      ("model.language.num_kv_heads", "the language model's key/value heads", self.language.num_kv_heads)]
        return heads

    def head_padding_for(self, tp: int) -> list[str]:
        """Overrides that pad every vision-side attention whose heads ``tp`` does not divide (the
        ViT, the Q-Former, the Perceiver resampler) with zero dummy heads to the next multiple."""
        def up(heads: int) -> int:
            return -(-heads // tp) * tp

        overrides = []
        if self.vision is not None and self.vision.num_heads % tp:
            overrides.append(f"vision.padded_heads={up(self.vision.num_heads)}")
        if self.qformer is not None and self.qformer.num_heads % tp:
            overrides.append(f"qformer.padded_heads={up(self.qformer.num_heads)}")
        if self.flamingo is not None and self.flamingo.use_resampler and self.flamingo.resampler_heads % tp:
            overrides.append(f"flamingo.resampler_padded_heads={up(self.flamingo.resampler_heads)}")
        return overrides

    @property
    def vision_layers(self) -> int:
        """ViT layers the model builds (0 without a vision encoder)."""
        return self.vision.layers_to_build if self.vision is not None else 0

    @property
    def placeholder_ids(self) -> list[int]:
        """Ids that stand for image positions and are never generated: <image>, and the
        image-newline of raw patch inputs."""
        return [self.image_token_id] + ([self.patches.newline_token_id] if self.patches is not None else [])

    @property
    def media_tokens(self) -> int:
        """Flamingo: the tokens one image gives the cross-attention (the resampler's latents, or
        every ViT token without a resampler)."""
        return self.flamingo.num_latents if self.flamingo.use_resampler else self.vision.tokens_per_image

    @property
    def image_tokens(self) -> int:
        """LLM positions one image input fills: the Q-Former's queries, the ViT's tokens, one
        <image> marker (Flamingo: images enter through cross-attention, not the sequence), or one
        patch (raw patch inputs: an image is as many inputs as it has patches)."""
        if self.flamingo is not None or self.patches is not None:
            return 1
        if self.connector.type == "pixel_shuffle_mlp":
            return self.vision.num_patches // 4
        return self.qformer.num_query_tokens if self.qformer is not None else self.vision.tokens_per_image


@dataclass
class ParallelConfig:
    """Model-parallel sizes; data parallelism takes the rest of the world."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    sequence_parallel: bool = False
    # Uneven pipeline splits (megatron-core semantics); None: even split.
    first_stage_layers: Optional[int] = None
    last_stage_layers: Optional[int] = None

    def __post_init__(self):
        check(self.tensor_parallel >= 1, "parallel.tensor_parallel", "must be >= 1")
        check(self.pipeline_parallel >= 1, "parallel.pipeline_parallel", "must be >= 1")
