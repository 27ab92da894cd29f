"""Adapters in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``) for the
HF-converted model: ``PeftModel.from_pretrained(hf_model, out_dir)`` reproduces megavlm's outputs."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from megavlm.peft.lora import HF_NAMES

_KEY = re.compile(r"^language_model\.decoder\.layers\.(\d+)\.[\w.]+\.lora\.(\w+)\.lora_([AB])$")
HF_LLM_PREFIX = {"llava": "model.language_model.layers"}


def peft_state(full_lora: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """megavlm full (unsharded) adapter tensors -> PEFT key names."""
    prefix = HF_LLM_PREFIX[family]
    out = {}
    for key, tensor in full_lora.items():
        match = _KEY.match(key)
        if not match:
            raise KeyError(f"{key} is not a decoder-layer LoRA tensor")
        layer, target, factor = match.groups()
        out[f"base_model.model.{prefix}.{layer}.{HF_NAMES[target]}.lora_{factor}.weight"] = tensor.contiguous()
    return out


def peft_config(lora_cfg, family: str, base_model: str | None = None) -> dict:
    names = "|".join(HF_NAMES[t].split(".")[-1] for t in lora_cfg.targets)
    return {"peft_type": "LORA", "task_type": None, "r": lora_cfg.rank, "lora_alpha": lora_cfg.alpha,
            "lora_dropout": lora_cfg.dropout, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
            "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
            # the vision tower has q/k/v/out projections too: adapt only the language model's
            "target_modules": rf".*{HF_LLM_PREFIX[family].split('.layers')[0]}.*\.({names})",
            "base_model_name_or_path": base_model}


def write_peft(out_dir: str | Path, full_lora: dict[str, torch.Tensor], lora_cfg, family: str,
               base_model: str | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(peft_state(full_lora, family), str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(peft_config(lora_cfg, family, base_model), indent=2))
    return out
