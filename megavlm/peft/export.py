"""Adapters in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``) for the
HF-converted model: ``PeftModel.from_pretrained(<family HF class>.from_pretrained(hf_base), out_dir)``
reproduces megavlm's outputs.

PEFT names an adapter by the HF module it wraps. Each family's state-dict adapter says where the
decoder layers sit in its HF class (``hf_decoder_layers``) and which module of a layer each LoRA
target adapts (``hf_lora_modules``). A target's B rows are already in HF's output order (the fused
QKV keeps each target's rows in HF head order), so A and B are written as they are.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

_KEY = re.compile(r"^language_model\.decoder\.layers\.(\d+)\.[\w.]+\.lora\.(\w+)\.lora_([AB])$")


def export_problem(model_cfg, lora_cfg) -> str | None:
    """Why this model's LoRA adapters cannot be written for PEFT, or None."""
    from megavlm.models.registry import get_family

    adapter = get_family(model_cfg.family).adapter_cls(model_cfg)
    if adapter.hf_decoder_layers is None:
        return f"the {model_cfg.family} model (head: {model_cfg.head}) has no HF decoder for PEFT to adapt"
    missing = [t for t in lora_cfg.targets if t not in adapter.hf_lora_modules]
    if missing:
        return (f"LoRA target(s) {missing} have no module in the HF decoder (it has "
                f"{', '.join(adapter.hf_lora_modules)})")
    return None


def peft_state(full_lora: dict[str, torch.Tensor], adapter) -> dict[str, torch.Tensor]:
    """megavlm full (unsharded) adapter tensors -> PEFT key names, through the family's adapter."""
    out = {}
    for key, tensor in full_lora.items():
        match = _KEY.match(key)
        if not match:
            raise KeyError(f"{key} is not a decoder-layer LoRA tensor")
        layer, target, factor = match.groups()
        module = f"{adapter.hf_decoder_layers}.{layer}.{adapter.hf_lora_modules[target]}"
        out[f"base_model.model.{module}.lora_{factor}.weight"] = tensor.contiguous()
    return out


def peft_config(lora_cfg, adapter, base_model: str | None = None) -> dict:
    modules = "|".join(re.escape(adapter.hf_lora_modules[t]) for t in lora_cfg.targets)
    return {"peft_type": "LORA", "task_type": None, "r": lora_cfg.rank, "lora_alpha": lora_cfg.alpha,
            "lora_dropout": lora_cfg.dropout, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
            "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
            # the decoder layers only: the vision tower (and IDEFICS' cross-attention) have q/k/v too
            "target_modules": rf"{re.escape(adapter.hf_decoder_layers)}\.\d+\.({modules})",
            "base_model_name_or_path": base_model}


def write_peft(out_dir: str | Path, full_lora: dict[str, torch.Tensor], lora_cfg, adapter,
               base_model: str | None = None) -> Path:
    """``adapter``: the family's state-dict adapter for the model the adapters were trained in."""
    problem = export_problem(adapter.model, lora_cfg)
    if problem:
        raise ValueError(f"cannot export PEFT adapters: {problem}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(peft_state(full_lora, adapter), str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(peft_config(lora_cfg, adapter, base_model), indent=2))
    return out


def export_for_hf(shards: dict, model_cfg, adapter, lora_cfg, root: str | Path) -> tuple[Path, Path]:
    """Every process's local tensors (``full_precision_state``, keyed by (tp_rank, pp_rank)) ->
    ``root/peft`` (the adapters) and ``root/hf_base`` (the HF model they apply to; QLoRA's base
    as dequantised from NF4). Returns both directories."""
    from megavlm.models.common.hf_io import write_hf_dir
    from megavlm.models.registry import get_family

    root = Path(root)
    full = adapter.plan.unshard(shards)
    peft_dir = write_peft(root / "peft", {k: v for k, v in full.items() if ".lora." in k}, lora_cfg, adapter,
                          base_model=str(root / "hf_base"))
    config, hf_state = get_family(model_cfg.family).complete_for_hf(model_cfg, adapter.megavlm_to_hf(shards), None)
    write_hf_dir(root / "hf_base", config, hf_state)
    return peft_dir, root / "hf_base"
