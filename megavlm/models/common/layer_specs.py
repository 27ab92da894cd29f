"""The one place that chooses layer implementations, so that a model file never branches on them.

``local``: megatron-core's tensor-parallel linears (with a one-GEMM frozen-weight backward), the
project's norms (sequence-parallel capable) and SDPA / varlen core attention; runs on CPU and
GPU. ``te``: megatron-core's Transformer Engine spec (fused LayerNorm+linear, fused attention,
FP8); chosen only when the config asks for it, and an error if TE is not importable.
"""
from __future__ import annotations

import copy
import functools

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megavlm.models.common.attention import SDPAttention
from megavlm.models.common.linears import ColumnLinear, RowLinear
from megavlm.models.common.norms import Norm

# Local norms live outside the linears; store them under TE's fused names so checkpoints move
# freely between the local and TE implementations.
_TE_COMPATIBLE_NORM_KEYS = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


@functools.lru_cache(maxsize=1)
def te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions import transformer_engine as _mte  # noqa: F401
    except Exception:  # ImportError, or a TE build that does not match this torch/CUDA
        return False
    return True


def _require_te(impl: str) -> None:
    if impl == "te" and not te_available():
        raise RuntimeError("transformer_impl: te was requested but Transformer Engine is not importable; "
                           "install transformer-engine or use transformer_impl: local")
    if impl not in ("local", "te"):
        raise ValueError(f"unknown transformer_impl {impl!r} (expected 'local' or 'te')")


def _local_layer(mask_type: AttnMaskType) -> ModuleSpec:
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=Norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": mask_type},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnLinear,
                    core_attention=SDPAttention,
                    linear_proj=RowLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=Norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnLinear,
                                                                linear_fc2=RowLinear)),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=dict(_TE_COMPATIBLE_NORM_KEYS),
        ),
    )


def _te_layer(mask_type: AttnMaskType, qk_norm: bool = False) -> ModuleSpec:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_norm)
    spec.submodules.self_attention.params = {"attn_mask_type": mask_type}
    return spec


def decoder_layer_spec(impl: str, qk_norm: bool = False, prefix_lm: bool = False) -> ModuleSpec:
    """Self-attention layer of the language model: causal, or with the mask each batch brings
    (``prefix_lm``: bidirectional over each sample's prefix, models/common/prefix_lm.py); with a
    norm over each head's query and key channels when ``qk_norm`` (Persimmon)."""
    _require_te(impl)
    mask = AttnMaskType.arbitrary if prefix_lm else AttnMaskType.causal
    if impl == "te":
        return _te_layer(mask, qk_norm)
    spec = _local_layer(mask)
    if qk_norm:
        attention = spec.submodules.self_attention.submodules
        attention.q_layernorm = attention.k_layernorm = Norm
    return spec


def encoder_layer_spec(impl: str) -> ModuleSpec:
    """Bidirectional self-attention layer of the vision encoder."""
    _require_te(impl)
    return _local_layer(AttnMaskType.no_mask) if impl == "local" else _te_layer(AttnMaskType.no_mask)


def text_encoder_layer_spec(model_cfg) -> ModuleSpec:
    """A contrastive model's text layer: causal (CLIP) or bidirectional (SigLIP)."""
    impl = model_cfg.transformer_impl
    return decoder_layer_spec(impl) if model_cfg.contrastive.causal_text else encoder_layer_spec(impl)


def vision_layer_spec(model_cfg) -> ModuleSpec:
    """The ViT's layer: CLIP's, or InternViT's with full-width QK-norm and LayerScale
    (models/internvl/vision.py) when the vision config asks for them; a bias-free QKV projection
    when ``vision.qkv_bias`` is off."""
    vision, impl = model_cfg.vision, model_cfg.transformer_impl
    spec = encoder_layer_spec(impl)
    if not vision.qk_norm and vision.layer_scale is None and vision.qkv_bias:
        return spec
    from megavlm.models.internvl.vision import FullWidthRMSNorm

    spec = copy.deepcopy(spec)
    attention, mlp = spec.submodules.self_attention.submodules, spec.submodules.mlp.submodules
    if not vision.qkv_bias:
        attention.linear_qkv = _bias_free(_module_of(attention.linear_qkv))
    if vision.qk_norm:
        attention.q_layernorm = attention.k_layernorm = ModuleSpec(module=FullWidthRMSNorm,
                                                                   params={"real_heads": vision.num_heads})
    if vision.layer_scale is not None:
        params = {"layer_scale_init": vision.layer_scale}
        attention.linear_proj = ModuleSpec(module=_layer_scaled(_module_of(attention.linear_proj)), params=params)
        mlp.linear_fc2 = ModuleSpec(module=_layer_scaled(_module_of(mlp.linear_fc2)), params=params)
    return spec


def _module_of(spec_or_cls):
    return spec_or_cls.module if isinstance(spec_or_cls, ModuleSpec) else spec_or_cls


@functools.lru_cache(maxsize=None)
def _layer_scaled(row_parallel_cls: type) -> type:
    from megavlm.models.internvl.vision import layer_scaled

    return layer_scaled(row_parallel_cls)


@functools.lru_cache(maxsize=None)
def _bias_free(linear_cls: type) -> type:
    """``linear_cls`` built without a bias whatever ``add_bias_linear`` says: megatron-core gives
    the QKV projection a bias whenever the other linears have one."""

    class BiasFree(linear_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **dict(kwargs, bias=False))

    BiasFree.__name__ = BiasFree.__qualname__ = f"BiasFree{linear_cls.__name__}"
    return BiasFree


def norm_spec(impl: str):
    """Stand-alone norm (ViT ln_pre, final norms): LayerNorm or RMSNorm per the config."""
    _require_te(impl)
    if impl == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return Norm


def block_spec(layer_spec: ModuleSpec, impl: str, config, pp_rank: int = 0) -> TransformerBlockSubmodules:
    """A TransformerBlock of ``layer_spec`` layers (as many as pipeline stage ``pp_rank`` builds)
    whose final norm is ``norm_spec(impl)``: megatron-core would otherwise pick a torch norm that
    refuses sequence parallelism, whatever the layers use."""
    layers = get_num_layers_to_build(config, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * layers, layer_norm=norm_spec(impl))


def connector_cls(model_cfg):
    """LLaVA's MLP projector or InternVL's pixel shuffle + LayerNorm + MLP: PyTorch layers or
    the fused Triton kernels."""
    from megavlm.models.connectors.mlp_projector import FusedMLPProjector, MLPProjector
    from megavlm.models.connectors.pixel_shuffle import FusedPixelShuffleProjector, PixelShuffleProjector

    fused = model_cfg.kernels.connector == "triton"
    if model_cfg.connector.type == "pixel_shuffle_mlp":
        return FusedPixelShuffleProjector if fused else PixelShuffleProjector
    return FusedMLPProjector if fused else MLPProjector


def output_layer_cls(model_cfg) -> type:
    """The language model's output layer: logits, or hidden states for the fused linear
    cross-entropy head."""
    from megavlm.models.common.language_model import DeferredLogitsLinear

    return DeferredLogitsLinear if model_cfg.kernels.fused_linear_cross_entropy else ColumnLinear


def lm_head(model_cfg, tp_group, weight_fn=None):
    """How the last stage's output becomes a loss (and logits for evaluation)."""
    from megavlm.losses.lm_loss import FusedLinearHead, LogitsHead

    vocab = model_cfg.language.vocab_size
    kernels = model_cfg.kernels
    if kernels.fused_linear_cross_entropy:
        return FusedLinearHead(vocab, tp_group, weight_fn, kernels.loss_chunk_tokens)
    if kernels.cross_entropy == "triton":
        from megavlm.kernels.cross_entropy import triton_cross_entropy

        return LogitsHead(vocab, tp_group, lambda lg, t, v, g: triton_cross_entropy(lg, t, v, g, inplace_backward=True))
    return LogitsHead(vocab, tp_group)
