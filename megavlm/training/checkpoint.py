"""megavlm checkpoints: megatron-core dist_checkpointing (layout-independent: saved at any TP/PP,
loaded at any other) plus the model config as YAML beside it."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from megavlm.config.model import ModelConfig
from megavlm.config.schema import from_dict, to_dict
from megavlm.training.build import load_local_state

MODEL_SUBDIR = "model"
MODEL_CONFIG_FILE = "model.yaml"


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def save_model(model: torch.nn.Module, model_cfg: ModelConfig, path: str | Path) -> None:
    """Collective: every rank writes its shards of ``model`` (an unwrapped model chunk)."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    if _is_rank0():
        (path / MODEL_SUBDIR).mkdir(parents=True, exist_ok=True)
        (path / MODEL_CONFIG_FILE).write_text(yaml.safe_dump(to_dict(model_cfg), sort_keys=False))
    if dist.is_initialized():
        dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(path / MODEL_SUBDIR))


def read_model_config(path: str | Path) -> ModelConfig:
    file = Path(path) / MODEL_CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist: not a megavlm checkpoint directory")
    return from_dict(ModelConfig, yaml.safe_load(file.read_text()), source=str(file))


def load_model(model: torch.nn.Module, path: str | Path) -> None:
    """Collective: fills ``model`` (any TP/PP layout) from the checkpoint at ``path``."""
    from megatron.core import dist_checkpointing

    model_dir = Path(path) / MODEL_SUBDIR
    if not (model_dir / "metadata.json").is_file():
        raise FileNotFoundError(f"{model_dir} holds no dist checkpoint (metadata.json is missing)")
    load_local_state(model, dist_checkpointing.load(model.sharded_state_dict(), os.fspath(model_dir)))
