"""Declarative stages: freezing, train/eval modes and optimizer groups follow the component tag every
parameter carries, so a recipe's ``stage.trainable`` list is the whole description of a stage."""
from __future__ import annotations

import torch
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_standard_config_overrides
from megatron.core.optimizer.optimizer_config import ParamKey, ParamPredicate

from megavlm.config.recipe import OptimizerConfig, StageConfig
from megavlm.config.schema import ConfigError
from megavlm.models.common.tags import component_of


def apply_stage(model: torch.nn.Module, stage: StageConfig) -> dict[str, int]:
    """Insert LoRA adapters when the stage asks for them, then freeze every parameter whose
    component is not trainable in ``stage``; returns the number of trainable parameters per
    component on this rank. Frozen parameters get no gradient buffer in megatron-core's DDP and
    no optimizer state (both only look at ``requires_grad``)."""
    if stage.lora is not None:
        from megavlm.peft.lora import apply_lora

        language = model.language_model
        apply_lora(language, stage.lora, gated=language.config.gated_linear_unit)
    counts: dict[str, int] = {}
    for param in model.parameters():
        component = component_of(param)
        trainable = component in stage.trainable
        param.requires_grad_(trainable)
        if trainable:
            counts[component] = counts.get(component, 0) + param.numel()
    set_train_mode(model)
    return counts


def _frozen(module: torch.nn.Module) -> bool:
    params = list(module.parameters())
    return bool(params) and not any(p.requires_grad for p in params)


def set_train_mode(model: torch.nn.Module, training: bool = True) -> None:
    """model.train(training), then eval mode for every fully frozen submodule (no dropout or
    norm-statistics updates in what does not train). Call it instead of model.train()."""
    model.train(training)
    if not training:
        return
    for module in model.modules():
        if module is not model and _frozen(module):
            module.eval()


def _component_key(component: str) -> ParamKey:
    return ParamKey(predicate=ParamPredicate(name=f"component={component}",
                                             fn=lambda p, c=component: getattr(p, "megavlm_component", None) == c))


def megatron_optimizer_config(opt: OptimizerConfig, dtype: torch.dtype) -> MegatronOptimizerConfig:
    return MegatronOptimizerConfig(
        optimizer="adam", lr=opt.lr, min_lr=opt.lr * opt.min_lr_ratio, weight_decay=opt.weight_decay,
        adam_beta1=opt.beta1, adam_beta2=opt.beta2, adam_eps=opt.eps, clip_grad=opt.clip_grad,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, params_dtype=dtype,
        use_distributed_optimizer=opt.distributed,
    )


def _vit_depth_key(depth: int) -> ParamKey:
    return ParamKey(predicate=ParamPredicate(
        name=f"vision_depth={depth}",
        fn=lambda p, d=depth: getattr(p, "megavlm_component", None) == "vision" and getattr(p, "megavlm_vit_depth", -1) == d))


def optimizer_groups(stage: StageConfig, opt: OptimizerConfig, config: MegatronOptimizerConfig,
                     vision_layers: int = 0) -> dict:
    """megatron-core param-group overrides: no weight decay on biases and norms (1-D), each
    component's own learning rate and weight decay from the stage, and with
    ``stage.vision_layer_decay`` one learning rate per ViT depth (``vision_layers`` layers)."""
    overrides = get_standard_config_overrides(config)
    for component, lr in stage.lr.items():
        if component not in stage.trainable:
            raise ConfigError(f"bad value for 'stage.lr.{component}': the component does not train in this stage")
        if component == "vision" and stage.vision_layer_decay is not None:
            continue  # per depth below
        overrides[_component_key(component)] = {"max_lr": lr, "min_lr": lr * opt.min_lr_ratio}
    if stage.vision_layer_decay is not None:
        base = stage.lr.get("vision", opt.lr)
        for depth in range(vision_layers + 2):
            lr = base * stage.vision_layer_decay ** (vision_layers + 1 - depth)
            overrides[_vit_depth_key(depth)] = {"max_lr": lr, "min_lr": lr * opt.min_lr_ratio}
    for component, wd in stage.weight_decay.items():
        if component not in stage.trainable:
            raise ConfigError(f"bad value for 'stage.weight_decay.{component}': the component does not train in this stage")
        key = _component_key(component)
        overrides[key] = dict(overrides.get(key, {}), start_wd=wd, end_wd=wd)
    return overrides
