"""megavlm configs -> megatron-core TransformerConfig, for the language model and the ViT."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megavlm.config.model import LanguageConfig, ModelConfig, ParallelConfig, VisionConfig



def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's GELU approximation. megatron-core's copy is wrapped in torch.compile, which costs
    seconds of compilation per process on CPU for an op this small."""
    return x * torch.sigmoid(1.702 * x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (SigLIP's gelu_pytorch_tanh, Gemma's GeGLU gate)."""
    return F.gelu(x, approximate="tanh")


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2 (Persimmon); megatron-core's copy is torch.compile'd, as quick_gelu's above."""
    return F.relu(x).square()


_LM_ACTIVATIONS = {"swiglu": (F.silu, True), "geglu": (gelu_tanh, True), "gelu": (F.gelu, False),
                   "relu": (F.relu, False), "squared_relu": (squared_relu, False),
                   "quick_gelu": (quick_gelu, False), "gelu_tanh": (gelu_tanh, False)}
_VIT_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu, "gelu_tanh": gelu_tanh}


def vision_activation(name: str):
    """The ViT's MLP activation by config name (also SigLIP's attention-pooling MLP)."""
    return _VIT_ACTIVATIONS[name]


def _common(model: ModelConfig, parallel: ParallelConfig, dtype: torch.dtype, recompute: bool) -> dict:
    return dict(
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # Fusions that need apex/CUDA extensions are off; layer_specs picks TE for the fused path.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=parallel.tensor_parallel,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        init_method_std=model.init_std,
        # Loss is a token sum; the pipeline schedule and finalize_model_grads divide by the token
        # count of the whole global batch (all micro-batches, all DP ranks).
        calculate_per_token_loss=True,
        recompute_granularity="full" if recompute else None,
        recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None,
        transformer_impl="transformer_engine" if model.transformer_impl == "te" else "local",
        fp8="hybrid" if model.fp8 else None,
        fp8_recipe={"delayed": "delayed", "current": "tensorwise"}.get(model.fp8, "delayed"),
    )


def language_transformer_config(model: ModelConfig, parallel: ParallelConfig, dtype: torch.dtype = torch.float32,
                                recompute: bool = False, language: LanguageConfig | None = None) -> TransformerConfig:
    """The LLM's config, or a contrastive model's text encoder's (never pipelined: the text
    encoder lives whole with the ViT, so give ``parallel`` with pipeline_parallel 1)."""
    lang = language or model.language
    activation, gated = _LM_ACTIVATIONS[lang.activation]
    return TransformerConfig(
        num_layers=lang.num_layers,
        hidden_size=lang.hidden_size,
        num_attention_heads=lang.num_heads,
        num_query_groups=lang.query_groups,
        ffn_hidden_size=lang.ffn_hidden_size,
        kv_channels=lang.head_dim,
        normalization=lang.normalization,
        layernorm_epsilon=lang.norm_eps,
        layernorm_zero_centered_gamma=lang.zero_centered_norm,
        qk_layernorm=lang.qk_norm,
        gated_linear_unit=gated,
        activation_func=activation,
        add_bias_linear=lang.linear_bias,
        add_qkv_bias=lang.qkv_bias or lang.linear_bias,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        num_layers_in_first_pipeline_stage=parallel.first_stage_layers,
        num_layers_in_last_pipeline_stage=parallel.last_stage_layers,
        **_common(model, parallel, dtype, recompute),
    )


def vision_transformer_config(model: ModelConfig, parallel: ParallelConfig, dtype: torch.dtype = torch.float32,
                              recompute: bool = False, vision: VisionConfig | None = None) -> TransformerConfig:
    """The ViT lives whole on the first pipeline stage: its own pipeline size is 1."""
    vis = vision or model.vision
    return TransformerConfig(
        num_layers=vis.layers_to_build,
        hidden_size=vis.hidden_size,
        num_attention_heads=vis.built_heads,   # dummy heads included: they keep the real head size
        ffn_hidden_size=vis.ffn_hidden_size,
        kv_channels=vis.hidden_size // vis.num_heads,
        normalization=vis.normalization,
        layernorm_epsilon=vis.norm_eps,
        gated_linear_unit=False,
        activation_func=_VIT_ACTIVATIONS[vis.activation],
        add_bias_linear=True,
        add_qkv_bias=True,
        pipeline_model_parallel_size=1,
        **_common(model, parallel, dtype, recompute),
    )


def without_sequence_parallel(config: TransformerConfig) -> TransformerConfig:
    """``config`` for a module that sees whole tensors on every TP rank (connectors, Q-Former,
    resampler): its parallel linears must not gather or scatter the sequence axis."""
    return dataclasses.replace(config, sequence_parallel=False) if config.sequence_parallel else config


def _side_module_config(model: ModelConfig, parallel: ParallelConfig, dtype: torch.dtype, layers: int, hidden: int,
                        heads: int, ffn: int, head_dim: int, eps: float, bias: bool) -> TransformerConfig:
    """Shapes, TP size and initialisation for the parallel linears of a module beside the two
    transformers (Q-Former, Perceiver resampler). It lives whole on the first pipeline stage."""
    return without_sequence_parallel(TransformerConfig(
        num_layers=layers,   # scales the init of output projections
        hidden_size=hidden,
        num_attention_heads=heads,
        ffn_hidden_size=ffn,
        kv_channels=head_dim,
        normalization="LayerNorm",
        layernorm_epsilon=eps,
        add_bias_linear=bias,
        pipeline_model_parallel_size=1,
        **_common(model, parallel, dtype, recompute=False),
    ))


def qformer_transformer_config(model: ModelConfig, parallel: ParallelConfig, dtype: torch.dtype = torch.float32
                               ) -> TransformerConfig:
    q = model.qformer
    return _side_module_config(model, parallel, dtype, q.num_layers, q.hidden_size, q.built_heads, q.ffn_hidden_size,
                               q.head_dim, q.norm_eps, bias=True)


def resampler_transformer_config(model: ModelConfig, parallel: ParallelConfig, dtype: torch.dtype = torch.float32
                                 ) -> TransformerConfig:
    f, width = model.flamingo, model.vision.hidden_size
    return _side_module_config(model, parallel, dtype, f.resampler_depth, width, f.resampler_built_heads,
                               f.resampler_ffn_mult * width, f.resampler_head_dim, 1e-5, bias=False)
