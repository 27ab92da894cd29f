"""Component tags: every parameter says which part of the model it belongs to.

Stages name components (``vision``, ``connector``, ``fusion``, ``llm``, ``lora``, and ``text``: a
contrastive model's text encoder) to freeze,
train and give learning rates; nothing else in the code looks at module names for that.
"""
from __future__ import annotations

import torch

COMPONENTS = ("vision", "connector", "fusion", "llm", "lora", "text")
_ATTR = "megavlm_component"


def tag_component(module: torch.nn.Module, component: str) -> torch.nn.Module:
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; known: {', '.join(COMPONENTS)}")
    for param in module.parameters():
        setattr(param, _ATTR, component)
    return module


def component_of(param: torch.nn.Parameter) -> str:
    try:
        return getattr(param, _ATTR)
    except AttributeError:
        raise ValueError(f"parameter of shape {tuple(param.shape)} has no component tag") from None


def parameters_by_component(module: torch.nn.Module) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    groups: dict[str, list] = {}
    for name, param in module.named_parameters():
        groups.setdefault(component_of(param), []).append((name, param))
    return groups
