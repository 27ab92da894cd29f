"""Read and write HF-format checkpoint directories (config.json + safetensors) from local disk only."""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SHARD_BYTES = 4 * 1024**3


class LazyHFState(Mapping):
    """An HF checkpoint's tensors by name, read from its safetensors files one tensor at a time
    when asked for (memory-mapped; nothing is held here), each cast to ``dtype`` on its own: a bf16
    checkpoint loaded in fp32 never has both full copies in memory."""

    def __init__(self, files: dict[str, Path], dtype: torch.dtype | None = None):
        self._files, self._dtype = files, dtype

    def __getitem__(self, key: str) -> torch.Tensor:
        file = self._files[key]
        with safe_open(str(file), framework="pt") as f:
            tensor = f.get_tensor(key)
        if self._dtype is not None and tensor.is_floating_point() and tensor.dtype != self._dtype:
            tensor = tensor.to(self._dtype)
        return tensor

    def __iter__(self):
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def renamed(hf: Mapping, renames: list) -> dict:
    """``hf`` with every name rewritten by the (pattern, replacement) pairs in turn: the names older
    transformers releases wrote, as the current classes name them."""
    out = {}
    for key, value in hf.items():
        for pattern, replacement in renames:
            key = pattern.sub(replacement, key)
        out[key] = value
    return out


def _tensor_files(path: Path) -> dict[str, Path]:
    """Tensor name -> its file: from model.safetensors.index.json when there is one (and every
    file it names must exist), else from every *.safetensors file in the directory."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no 'weight_map'")
        missing = sorted({name for name in weight_map.values() if not (path / name).is_file()})
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that do not exist: {missing}")
        return {key: path / name for key, name in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path} (pytorch_model.bin checkpoints are not read)")
    out: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key in out:
                    raise ValueError(f"tensor {key!r} appears in two files of {path}: {out[key].name} and {file.name}")
                out[key] = file
    return out


def read_hf_dir(path: str | Path, dtype: torch.dtype | None = None) -> tuple[dict, LazyHFState]:
    """(config.json as a dict, the checkpoint's tensors, read lazily and cast to ``dtype`` if given)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} does not exist: expected an HF checkpoint directory")
    return json.loads(config_file.read_text()), LazyHFState(_tensor_files(path), dtype)


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
