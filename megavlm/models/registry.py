"""Model families by name: their flavors, model class and HF state-dict adapter."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from megavlm.config.model import ModelConfig


@dataclass(frozen=True)
class Family:
    name: str
    flavors: dict[str, Callable[[], ModelConfig]]
    model_cls: type
    adapter_cls: type
    config_from_hf: Callable[[dict], ModelConfig]
    config_to_hf: Callable[[ModelConfig], dict]
    hf_class: str        # transformers class name of the HF reference
    hf_model_type: str   # config.json "model_type" of that class
    complete_for_hf: Callable  # (model_cfg, hf_state, reference) -> (hf_config, hf_state) loadable by HF
    # (model_cfg, megavlm batch) -> the image arguments of the HF class's forward
    hf_inputs: Callable = lambda model_cfg, batch: {"pixel_values": batch["images"]}
    other_hf_model_types: tuple[str, ...] = ()   # more HF layouts the family converts (SigLIP's for clip)


def _llava() -> Family:
    from megavlm.models import llava
    from megavlm.models.llava import state_dict_adapter as adapter
    from megavlm.models.llava.model import LlavaModel

    return Family("llava", llava.FLAVORS, LlavaModel, adapter.LlavaStateDictAdapter, adapter.config_from_hf,
                  adapter.config_to_hf, "LlavaForConditionalGeneration", "llava", adapter.complete_for_hf)


def _blip2() -> Family:
    from megavlm.models import blip2
    from megavlm.models.blip2 import state_dict_adapter as adapter
    from megavlm.models.blip2.model import Blip2Model, Blip2RepresentationModel

    def build(model_cfg, *args, **kwargs):
        cls = Blip2RepresentationModel if model_cfg.head == "qformer" else Blip2Model
        return cls(model_cfg, *args, **kwargs)

    return Family("blip2", blip2.FLAVORS, build, adapter.Blip2StateDictAdapter, adapter.config_from_hf,
                  adapter.config_to_hf, "Blip2ForConditionalGeneration", "blip-2", adapter.complete_for_hf)


def _flamingo() -> Family:
    from megavlm.models import flamingo
    from megavlm.models.flamingo import state_dict_adapter as adapter
    from megavlm.models.flamingo.model import FlamingoModel

    return Family("flamingo", flamingo.FLAVORS, FlamingoModel, adapter.FlamingoStateDictAdapter, adapter.config_from_hf,
                  adapter.config_to_hf, adapter.ARCHITECTURE, "idefics", adapter.complete_for_hf, adapter.hf_inputs)


def _internvl() -> Family:
    from megavlm.models import internvl
    from megavlm.models.internvl import state_dict_adapter as adapter
    from megavlm.models.internvl.model import InternVLModel

    return Family("internvl", internvl.FLAVORS, InternVLModel, adapter.InternVLStateDictAdapter, adapter.config_from_hf,
                  adapter.config_to_hf, adapter.ARCHITECTURE, "internvl", adapter.complete_for_hf)


def _clip() -> Family:
    from megavlm.models import clip
    from megavlm.models.clip import state_dict_adapter as adapter
    from megavlm.models.clip.model import ContrastiveModel

    return Family("clip", clip.FLAVORS, ContrastiveModel, adapter.ContrastiveStateDictAdapter, adapter.config_from_hf,
                  adapter.config_to_hf, adapter.CLIP, "clip", adapter.complete_for_hf,
                  other_hf_model_types=("siglip",))


def _fuyu() -> Family:
    from megavlm.models import fuyu
    from megavlm.models.fuyu import state_dict_adapter as adapter
    from megavlm.models.fuyu.model import FuyuModel

    return Family("fuyu", fuyu.FLAVORS, FuyuModel, adapter.FuyuStateDictAdapter, adapter.config_from_hf,
                  adapter.config_to_hf, adapter.ARCHITECTURE, "fuyu", adapter.complete_for_hf, adapter.hf_inputs)


def _paligemma() -> Family:
    from megavlm.models import paligemma
    from megavlm.models.paligemma import state_dict_adapter as adapter
    from megavlm.models.paligemma.model import PaliGemmaModel

    return Family("paligemma", paligemma.FLAVORS, PaliGemmaModel, adapter.PaliGemmaStateDictAdapter,
                  adapter.config_from_hf, adapter.config_to_hf, adapter.ARCHITECTURE, "paligemma",
                  adapter.complete_for_hf, adapter.hf_inputs)


_FAMILIES = {"llava": _llava, "blip2": _blip2, "flamingo": _flamingo, "internvl": _internvl, "clip": _clip,
             "fuyu": _fuyu, "paligemma": _paligemma}


def get_family(name: str) -> Family:
    try:
        return _FAMILIES[name]()
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(sorted(_FAMILIES))}") from None


def family_for_hf(hf_config: dict) -> Family:
    """The family whose HF reference class wrote this config.json."""
    model_type = hf_config.get("model_type")
    for name in _FAMILIES:
        family = get_family(name)
        if model_type in (family.hf_model_type, *family.other_hf_model_types):
            return family
    raise ValueError(f"no megavlm family converts HF model_type {model_type!r}")


def flavor_config(family: str, flavor: str) -> ModelConfig:
    flavors = get_family(family).flavors
    if flavor not in flavors:
        raise ValueError(f"unknown {family} flavor {flavor!r}; known: {', '.join(flavors)}")
    return flavors[flavor]()
