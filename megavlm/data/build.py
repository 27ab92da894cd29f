"""Build the data side of a run from its DataConfig: sources or a mixture, curriculum, sampler,
example builder, image backend and step loader."""
from __future__ import annotations

from pathlib import Path

from megavlm.config.schema import ConfigError
from megavlm.data.images import make_backend
from megavlm.data.loader import LoaderConfig, StepLoader
from megavlm.data.mixture import MixtureDataset, curriculum_order
from megavlm.data.records import open_source
from megavlm.data.sampler import GlobalBatchSampler
from megavlm.data.templates import ConversationEncoder, get_template


def _open(path: str, fmt: str, root, key: str, curriculum_key):
    if not path:
        raise ConfigError(f"missing key '{key}' in the recipe")
    if not Path(path).is_file():
        raise ConfigError(f"bad value for '{key}': {path} does not exist")
    try:
        return open_source(path, fmt, root, curriculum_key)
    except ValueError as err:
        raise ConfigError(f"bad value for '{key}': {err}") from None


def training_dataset(data):
    """One source, or a weighted mixture of sources."""
    if not data.sources:
        return _open(data.train, data.format, data.root, "data.train", data.curriculum_key)
    sources = [_open(s.path, s.format, s.root, f"data.sources[{i}].path", data.curriculum_key)
               for i, s in enumerate(data.sources)]
    names = [s.name or Path(s.path).stem for s in data.sources]
    return MixtureDataset(sources, [s.weight for s in data.sources], data.samples_per_epoch, names)


def encoder_for(model_cfg, tokenizer, template: str, unrepresentable: str = "train") -> ConversationEncoder:
    return ConversationEncoder(tokenizer, get_template(template), model_cfg.image_tokens,
                               model_cfg.image_token_id, unrepresentable)


def build_step_loader(recipe, tokenizer, builder, collate: str, dp_rank: int, dp_size: int,
                      device_id: int | None = None):
    """(dataset, sampler, loader) for training; ``builder`` turns records into examples, images
    decode on GPU ``device_id`` (this rank's) when the backend runs there."""
    data, train = recipe.data, recipe.train
    dataset = training_dataset(data)
    order = curriculum_order(dataset) if data.curriculum_key else None
    sampler = GlobalBatchSampler(len(dataset), train.global_batch_size, train.micro_batch_size, dp_rank, dp_size,
                                 seed=train.seed, shuffle=data.shuffle, order=order)
    backend = make_backend(data.image_backend, recipe.model.vision.image_size, max(1, data.num_workers), device_id)
    cfg = LoaderConfig(train.seq_length, train.micro_batch_size, tokenizer.pad_id, recipe.model.vision.image_size,
                       packing=data.packing, workers=data.num_workers if backend.name == "pil" else 0,
                       prefetch=data.prefetch, collate=collate)
    return dataset, sampler, StepLoader(dataset, builder, sampler, backend, cfg)


def open_eval_source(path: str, fmt: str, root, key: str):
    """A held-out file (validation, captions test, VQA test) as a record source."""
    return _open(path, fmt, root, key, None)


def tile_planner(model_cfg, data_cfg):
    """The dynamic-resolution tile planner the data config asks for, or None."""
    if not data_cfg.max_tiles:
        return None
    from megavlm.data.tiles import TilePlanner

    return TilePlanner(model_cfg.vision.image_size, data_cfg.max_tiles, data_cfg.tile_thumbnail)
