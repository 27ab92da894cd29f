"""Build the data side of a run from its DataConfig: sources or a mixture, curriculum, sampler,
example builder, image backend and step loader."""
from __future__ import annotations

import functools
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
    """The chat-template encoder; with raw patch inputs each image's placeholders follow its grid
    (a newline after each row of patches, data/patches.py)."""
    layout = None
    if model_cfg.patches is not None:
        from megavlm.data.patches import grid_token_ids

        layout = functools.partial(grid_token_ids, image_token_id=model_cfg.image_token_id,
                                   newline_token_id=model_cfg.patches.newline_token_id)
    return ConversationEncoder(tokenizer, get_template(template), model_cfg.image_tokens,
                               model_cfg.image_token_id, unrepresentable, image_layout=layout)


def image_input_size(model_cfg):
    """What the collate's ``image_size`` is: the ViT's input side, or one raw patch's shape."""
    return (model_cfg.patches.patch_dim,) if model_cfg.patches is not None else model_cfg.vision.image_size


def image_backend(model_cfg, name: str = "pil", num_threads: int = 2, device_id: int | None = None):
    """The image decoder for a model: its input size (none for raw patches) and pixel normalisation."""
    size = None if model_cfg.vision is None else model_cfg.vision.image_size
    return make_backend(name, size, num_threads, device_id, model_cfg.image_mean, model_cfg.image_std)


def build_step_loader(recipe, tokenizer, builder, collate: str, dp_rank: int, dp_size: int,
                      device_id: int | None = None):
    """(dataset, sampler, loader) for training; ``builder`` turns records into examples, images
    decode on GPU ``device_id`` (this rank's) when the backend runs there."""
    data, train = recipe.data, recipe.train
    dataset = training_dataset(data)
    order = curriculum_order(dataset) if data.curriculum_key else None
    sampler = GlobalBatchSampler(len(dataset), train.global_batch_size, train.micro_batch_size, dp_rank, dp_size,
                                 seed=train.seed, shuffle=data.shuffle, order=order)
    backend = image_backend(recipe.model, data.image_backend, max(1, data.num_workers), device_id)
    cfg = LoaderConfig(train.seq_length, train.micro_batch_size, tokenizer.pad_id, image_input_size(recipe.model),
                       packing=data.packing, workers=data.num_workers if backend.name == "pil" else 0,
                       prefetch=data.prefetch, collate=collate, prefix_lm=recipe.model.prefix_lm)
    return dataset, sampler, StepLoader(dataset, builder, sampler, backend, cfg)


def open_eval_source(path: str, fmt: str, root, key: str):
    """A held-out file (validation, captions test, VQA test) as a record source."""
    return _open(path, fmt, root, key, None)


def tile_planner(model_cfg, data_cfg):
    """What decides each image's layout from its size, or None (one fixed-size image): the patch
    grid of raw patch inputs (data/patches.py), or the dynamic-resolution tiles the data config
    asks for (data/tiles.py)."""
    if model_cfg.patches is not None:
        from megavlm.data.patches import PatchGridPlanner

        return PatchGridPlanner(model_cfg.patches)
    if not data_cfg.max_tiles:
        return None
    from megavlm.data.tiles import TilePlanner

    return TilePlanner(model_cfg.vision.image_size, data_cfg.max_tiles, data_cfg.tile_thumbnail)
