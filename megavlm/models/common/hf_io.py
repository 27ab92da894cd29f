"""Read and write HF-format checkpoint directories (config.json + safetensors) from local disk only."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SHARD_BYTES = 4 * 1024**3


def read_hf_dir(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json as a dict, every tensor of every *.safetensors file in the directory)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} does not exist: expected an HF checkpoint directory")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path} (pytorch_model.bin checkpoints are not read)")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        for key, tensor in load_file(str(file)).items():
            if key in state:
                raise ValueError(f"tensor {key!r} appears in two files of {path}")
            state[key] = tensor
    return json.loads(config_file.read_text()), state


def write_hf_dir(path: str | Path, config: dict, state: dict[str, torch.Tensor], max_shard_bytes: int = SHARD_BYTES) -> None:
    """config.json and model(-0000i-of-0000n).safetensors (+ index when sharded)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size, seen = 0, set()
    for key in sorted(state):
        tensor = state[key].detach().contiguous().cpu()
        if tensor.data_ptr() in seen:  # safetensors refuses tensors that share memory
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}, indent=2))
