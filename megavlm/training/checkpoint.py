"""megavlm checkpoints on megatron-core dist_checkpointing.

A checkpoint directory holds ``model/`` (a dist checkpoint: model shards, optimizer state and
per-rank RNG states; layout-independent, so it loads at any TP/PP), ``model.yaml`` (the model
config) and ``trainer_state.json`` (step, data position, LR-scheduler state, skip counts,
metrics). Saves are atomic: everything is written into ``.tmp-step_N`` and renamed to ``step_N``
only after every rank finished, so a save killed half-way never looks complete and the previous
checkpoint still loads. ``files.json`` lists every file of ``model/`` with its size, so a shard
lost or truncated later (a full disk, a copy cut short) is found before loading, with the file
named; ``--resume`` then falls back to the previous intact checkpoint. Retention keeps the last K
and the best K by a validation metric measured at the checkpoint's own step, and never deletes
the only intact checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from megavlm.config.model import ModelConfig
from megavlm.config.recipe import CheckpointConfig
from megavlm.config.schema import from_dict, to_dict
from megavlm.training.build import load_local_state

log = logging.getLogger(__name__)

MODEL_SUBDIR = "model"
MODEL_CONFIG_FILE = "model.yaml"
TRAINER_STATE_FILE = "trainer_state.json"
FILES_MANIFEST = "files.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names the file."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ---- model-only checkpoints (converter, stage initialisation) -------------------------------
def save_model(model: torch.nn.Module, model_cfg: ModelConfig, path: str | Path, exclude: str | None = None) -> None:
    """Collective: every rank writes its shards of ``model`` (an unwrapped model chunk); keys
    containing ``exclude`` (e.g. merged-away LoRA adapters) are left out."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    if _rank() == 0:
        (path / MODEL_SUBDIR).mkdir(parents=True, exist_ok=True)
        (path / MODEL_CONFIG_FILE).write_text(yaml.safe_dump(to_dict(model_cfg), sort_keys=False))
    _barrier()
    state = model.sharded_state_dict()
    if exclude:
        state = {k: v for k, v in state.items() if exclude not in k}
    dist_checkpointing.save({"model": state}, str(path / MODEL_SUBDIR))


def read_model_config(path: str | Path) -> ModelConfig:
    file = resolve_checkpoint(path) / MODEL_CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist: not a megavlm checkpoint directory")
    return from_dict(ModelConfig, yaml.safe_load(file.read_text()), source=str(file))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run's checkpoint root (then its latest complete checkpoint)."""
    path = Path(path)
    if (path / MODEL_SUBDIR).is_dir():
        return path
    steps = sorted((int(m.group(1)), child) for child in (path.iterdir() if path.is_dir() else [])
                   if (m := _STEP_DIR.match(child.name)) and (child / TRAINER_STATE_FILE).is_file())
    if not steps:
        raise FileNotFoundError(f"{path} is neither a megavlm checkpoint nor a directory of complete checkpoints")
    return steps[-1][1]


def _require_dist_checkpoint(path: Path) -> Path:
    model_dir = path / MODEL_SUBDIR
    if not (model_dir / "metadata.json").is_file():
        raise FileNotFoundError(f"{model_dir} holds no dist checkpoint (metadata.json is missing)")
    problem = checkpoint_problem(path)
    if problem:
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}")
    return model_dir


def write_manifest(path: Path) -> None:
    """Every file under ``path/model`` with its size (written once all ranks finished the save)."""
    model_dir = path / MODEL_SUBDIR
    files = {os.fspath(f.relative_to(model_dir)): f.stat().st_size for f in sorted(model_dir.rglob("*")) if f.is_file()}
    (path / FILES_MANIFEST).write_text(json.dumps(files, indent=1))


def checkpoint_problem(path: Path) -> str | None:
    """What is wrong with the files of the checkpoint at ``path`` (a missing or truncated shard), or None."""
    model_dir = path / MODEL_SUBDIR
    manifest = path / FILES_MANIFEST
    if not manifest.is_file():  # written before the manifest existed: only the metadata can be checked
        return None if (model_dir / "metadata.json").is_file() else f"{model_dir / 'metadata.json'} is missing"
    for name, size in json.loads(manifest.read_text()).items():
        file = model_dir / name
        if not file.is_file():
            return f"{file} is missing"
        found = file.stat().st_size
        if found != size:
            return f"{file} has {found} bytes, the save wrote {size} (truncated)" if found < size else \
                f"{file} has {found} bytes, the save wrote {size}"
    return None


def load_model(model: torch.nn.Module, path: str | Path, partial: bool = False, whole_on_every_rank: bool = False
               ) -> None:
    """Collective: fills ``model`` (any TP/PP layout) from the checkpoint at ``path``; the
    optimizer state a training checkpoint also holds is not read. ``partial``: tensors the
    checkpoint lacks keep their values (e.g. BLIP-2 stage 2 starts its Q-Former from stage 1 and
    its LLM from HF); which components were left out is logged. ``whole_on_every_rank``: every
    rank reads all of ``model`` (a CLIP scorer beside a model of another layout), so the check
    that each shard is read by exactly one rank does not apply."""
    from megatron.core import dist_checkpointing

    model_dir = os.fspath(_require_dist_checkpoint(resolve_checkpoint(path)))
    template = model.sharded_state_dict()
    if partial:
        stored = set(dist_checkpointing.load_tensors_metadata(model_dir))
        kept = {k: v for k, v in template.items() if getattr(v, "key", k) in stored}
        left = sorted({getattr(p, "megavlm_component", "?") for n, p in model.named_parameters() if n not in kept})
        if left and len(kept) < len(template):
            log.warning("%s holds no tensors for part of the model (components: %s): they keep their initialisation",
                        path, ", ".join(left))
        template = kept
    state = dist_checkpointing.load({"model": template}, model_dir, validate_access_integrity=not whole_on_every_rank)
    if partial:
        model.load_state_dict(state["model"], strict=False)
    else:
        load_local_state(model, state["model"])


def load_components(model: torch.nn.Module, path: str | Path, component: str, key: str) -> None:
    """Collective: the parameters tagged ``component`` from the megavlm checkpoint at ``path``,
    which may be another stage's or another family's (e.g. the ViT a CLIP stage trained, into a
    LLaVA's vision tower). Every tensor must be there with the model's shape, except that a
    checkpoint with more transformer layers than the model builds (LLaVA never runs the CLIP ViT's
    last layer) gives its first ones. ``key`` names the recipe key in errors."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megavlm.config.schema import ConfigError

    try:
        model_dir = os.fspath(_require_dist_checkpoint(resolve_checkpoint(path)))
    except (FileNotFoundError, CheckpointError) as err:
        raise ConfigError(f"bad value for '{key}': {err}") from None
    names = {n for n, p in model.named_parameters() if getattr(p, "megavlm_component", None) == component}
    if not names:
        raise ConfigError(f"bad value for '{key}': the model has no '{component}' component")
    stored = dist_checkpointing.load_tensors_metadata(model_dir)
    template, fewer_layers = {}, {}
    for name, item in model.sharded_state_dict().items():
        if name not in names:
            continue
        found = stored.get(item.key)
        if found is None:
            raise ConfigError(f"bad value for '{key}': {path} has no tensor {item.key!r} (for {name}); "
                              f"it must hold a model with the same {component} tower")
        if not isinstance(item, ShardedTensor):   # a factory (SwiGLU's [gate; up] under TP): built and checked on load
            template[name] = item
            continue
        want, have = tuple(item.global_shape), tuple(found.global_shape)
        if have == want:
            template[name] = item
        elif item.prepend_axis_num == 1 and have[1:] == want[1:] and have[0] > want[0]:
            fewer_layers[name] = item
        else:
            raise ConfigError(f"bad value for '{key}': {item.key} has shape {have} in {path} but {want} in the "
                              f"model: check the recipe's model section against the checkpoint's model.yaml")
    # layer-stacked tensors with layers past the model's are read whole and this rank's part cut out
    whole = {item.key: ShardedTensor.from_rank_offsets(item.key, torch.empty(tuple(stored[item.key].global_shape),
                                                                             dtype=item.dtype))
             for item in fewer_layers.values()}
    state = dist_checkpointing.load({"model": template, "whole": whole}, model_dir,
                                    validate_access_integrity=not fewer_layers)
    values = dict(state["model"])
    for name, item in fewer_layers.items():
        extent = (1,) * item.prepend_axis_num + tuple(item.local_shape)
        part = state["whole"][item.key][tuple(slice(o, o + n) for o, n in zip(item.global_offset, extent))]
        values[name] = part.reshape(item.local_shape)
    model.load_state_dict(values, strict=False)


# ---- RNG ---------------------------------------------------------------------------------------
def rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(world_size: int):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject("rng_state", rng_state(), (world_size,), (_rank(),), replica_id=0)


# ---- training checkpoints ---------------------------------------------------------------------
class CheckpointManager:
    def __init__(self, cfg: CheckpointConfig, model_cfg: ModelConfig, recipe_yaml: str = ""):
        if not cfg.dir:
            raise ValueError("checkpoint.dir is required to save or resume")
        self.cfg, self.model_cfg, self.recipe_yaml = cfg, model_cfg, recipe_yaml
        self.root = Path(cfg.dir)

    # -- discovery --
    def completed(self) -> list[tuple[int, Path]]:
        """(step, path) of complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for child in self.root.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and (child / TRAINER_STATE_FILE).is_file():
                found.append((int(match.group(1)), child))
        return sorted(found)

    def latest(self) -> Path | None:
        done = self.completed()
        return done[-1][1] if done else None

    def latest_intact(self) -> Path | None:
        """Collective: the newest complete checkpoint whose files are all there, as rank 0 sees
        it; each damaged newer one is reported and passed over."""
        choice = [None]
        if _rank() == 0:
            for _, path in reversed(self.completed()):
                problem = checkpoint_problem(path)
                if problem is None:
                    choice = [os.fspath(path)]
                    break
                log.warning("checkpoint %s is damaged (%s): falling back to the previous one", path, problem)
                print(f"checkpoint {path} is damaged ({problem}): falling back to the previous one", flush=True)
        if dist.is_initialized():
            dist.broadcast_object_list(choice, src=0)
        return Path(choice[0]) if choice[0] else None

    # -- save --
    def _sharded_state(self, model, optimizer, world_size: int, loading: bool = False) -> dict:
        model_sd = model.sharded_state_dict()
        if self.cfg.trainable_only:  # adapters and connector only; the frozen rest comes from stage.init_from
            trainable = {name for name, p in model.named_parameters() if p.requires_grad}
            model_sd = {k: v for k, v in model_sd.items() if k in trainable}
        state = {"model": model_sd, "rng_state": _rng_sharded_object(world_size)}
        if optimizer is not None:
            # Distributed optimizer: megatron-core 0.16's fully reshardable format cannot restore torch
            # Adam's per-parameter 'step' (only TE/apex fused Adam); its DP-reshardable one can.
            state["optimizer"] = optimizer.sharded_state_dict(
                model_sd, is_loading=loading, metadata={"distrib_optim_sharding_type": "dp_reshardable"})
        return state

    def save(self, step: int, model, optimizer, trainer_state: dict) -> Path:
        """Collective. ``model`` is the unwrapped chunk; trainer_state must be JSON-serialisable."""
        from megatron.core import dist_checkpointing

        world = dist.get_world_size() if dist.is_initialized() else 1
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp-step_{step:08d}"
        if _rank() == 0:
            for stale in self.root.glob(".tmp-step_*"):  # left by a save that was killed
                shutil.rmtree(stale, ignore_errors=True)
            (tmp / MODEL_SUBDIR).mkdir(parents=True, exist_ok=True)
        _barrier()
        dist_checkpointing.save(self._sharded_state(model, optimizer, world), str(tmp / MODEL_SUBDIR))
        _barrier()
        if _rank() == 0:
            (tmp / MODEL_CONFIG_FILE).write_text(yaml.safe_dump(to_dict(self.model_cfg), sort_keys=False))
            write_manifest(tmp)
            if self.recipe_yaml:
                (tmp / "recipe.yaml").write_text(self.recipe_yaml)
            state = dict(trainer_state, step=step, world_size=world)
            (tmp / TRAINER_STATE_FILE).write_text(json.dumps(state, indent=2))  # written last
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._retain()
        _barrier()
        return final

    def _retain(self) -> None:
        done = self.completed()
        keep = {path for _, path in done[-self.cfg.keep_last:]}
        if self.cfg.keep_best:
            scored = []
            for step, path in done:
                state = json.loads((path / TRAINER_STATE_FILE).read_text())
                metric = state.get("metrics", {}).get(self.cfg.best_metric)
                if metric is not None and state.get("metrics_step", step) == step:  # measured at this checkpoint
                    scored.append((metric, path))
            scored.sort(key=lambda mp: mp[0], reverse=self.cfg.best_mode == "max")
            keep |= {path for _, path in scored[: self.cfg.keep_best]}
        if all(checkpoint_problem(path) for path in keep):  # never delete the only intact checkpoint
            intact = [path for _, path in done if checkpoint_problem(path) is None]
            keep |= set(intact[-1:])
        for _, path in done:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)

    # -- load --
    @staticmethod
    def _materialize_optimizer_state(optimizer) -> None:
        """megatron-core 0.16's distributed optimizer builds its sharded state dict from existing
        Adam state (torch Adam keeps 'step' per parameter): a fresh one has none. Give it
        placeholder state (megatron-core's own helper, a zero-gradient step) that the load then
        overwrites; the model weights it may touch are loaded afterwards."""
        for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
            if hasattr(inner, "_init_optimizer_states_with_dummy_values") and not inner.optimizer.state:
                inner._init_optimizer_states_with_dummy_values()

    @staticmethod
    def _restore_adam_steps(optimizer, loaded: dict) -> None:
        """megatron-core 0.16's distributed optimizer does not put torch Adam's per-parameter
        'step' back (it keeps the placeholder's), which changes Adam's bias correction after a
        resume; the saved count is in its param groups."""
        inners = getattr(optimizer, "chained_optimizers", [optimizer])
        if len(inners) != 1 or not hasattr(inners[0], "model_param_group_index_map"):
            return
        groups = loaded.get("optimizer", {}).get("param_groups", []) if isinstance(loaded, dict) else []
        steps = {g["step"] for g in groups if g.get("step") is not None}
        if len(steps) != 1:
            return
        step = float(steps.pop())
        for state in inners[0].optimizer.state.values():
            if "step" in state:
                state["step"] = torch.tensor(step, dtype=state["step"].dtype, device=state["step"].device)

    def load(self, path: Path, model, optimizer) -> dict:
        """Collective: restores model, optimizer and (same world size) RNG; returns trainer state."""
        from megatron.core import dist_checkpointing

        trainer_state = json.loads((path / TRAINER_STATE_FILE).read_text())
        world = dist.get_world_size() if dist.is_initialized() else 1
        if optimizer is not None:
            self._materialize_optimizer_state(optimizer)
        template = self._sharded_state(model, optimizer, world, loading=True)
        same_world = trainer_state.get("world_size") == world
        if not same_world:
            template.pop("rng_state")
        state = dist_checkpointing.load(template, os.fspath(_require_dist_checkpoint(path)))
        if self.cfg.trainable_only:
            missing = set(template["model"]) - set(state["model"])
            if missing:
                raise KeyError(f"checkpoint {path} lacks trainable tensors {sorted(missing)[:4]}")
            model.load_state_dict(state["model"], strict=False)
        else:
            load_local_state(model, state["model"])
        if optimizer is not None:
            with torch.no_grad():  # the fp32 main params are views of the (trainable) model params
                optimizer.load_state_dict(state["optimizer"])
            self._restore_adam_steps(optimizer, state["optimizer"])
        if same_world:
            set_rng_state(state["rng_state"])
        else:
            log.warning("checkpoint %s was written by %s processes, this run has %s: RNG states not restored",
                        path, trainer_state.get("world_size"), world)
        return trainer_state
