"""A trained checkpoint ready to evaluate or chat with, at any TP/PP layout: the model it holds
(LoRA adapters included), the tokenizer and template of the recipe it was trained with."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from megavlm.config.model import ParallelConfig
from megavlm.config.recipe import Recipe, load_recipe
from megavlm.data.build import tile_planner
from megavlm.data.tokenizer import load_tokenizer
from megavlm.eval.vlm_eval import EvalContext
from megavlm.models.common.layer_specs import lm_head
from megavlm.parallel import init as pinit
from megavlm.training.build import build_model
from megavlm.training.checkpoint import load_model, read_model_config, resolve_checkpoint
from megavlm.training.stages import apply_stage, set_train_mode

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def checkpoint_recipe(ckpt: str | Path, overrides: list[str] = ()) -> Recipe:
    """The recipe saved beside the checkpoint (``recipe.yaml``), with key=value overrides."""
    path = resolve_checkpoint(ckpt) / "recipe.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the checkpoint has no recipe; pass a training checkpoint "
                                f"(a step_N directory or the run's checkpoint.dir)")
    return load_recipe(path, list(overrides))


def load_eval_model(ckpt: str | Path, recipe: Recipe, parallel: ParallelConfig, micro_batch_size: int | None = None,
                    dtype: str | None = None):
    """(EvalContext, ParallelContext) for the checkpoint under ``parallel`` (collective)."""
    path = resolve_checkpoint(ckpt)
    ctx = pinit.initialize(parallel, seed=recipe.train.seed)
    pgs = pinit.process_groups()
    model_cfg = read_model_config(path)
    model = build_model(model_cfg, parallel, ctx, pgs, dtype=DTYPES[dtype or recipe.train.dtype])
    if recipe.checkpoint.trainable_only and recipe.stage.init_from:  # the frozen rest lives there
        load_model(model, recipe.stage.init_from, partial=True)
    if recipe.stage.lora is not None:
        apply_stage(model, recipe.stage)
    load_model(model, path, partial=recipe.checkpoint.trainable_only)
    set_train_mode(model, False)
    tokenizer = load_tokenizer(recipe.data.tokenizer, recipe.data.added_tokens, recipe.data.image_piece,
                               require_image_token=model_cfg.head != "contrastive")
    head = lm_head(model_cfg, pgs.tp, model.output_weight if ctx.is_last_stage else None) if model_cfg.head == "lm" \
        else None
    eval_ctx = EvalContext([model], tokenizer, model_cfg, head, recipe.train.seq_length,
                           micro_batch_size or recipe.train.micro_batch_size, ctx.device, recipe.data.end_of_chunk,
                           tile_planner(model_cfg, recipe.data))
    return eval_ctx, ctx


def parallel_from_args(tp: int, pp: int) -> ParallelConfig:
    return dataclasses.replace(ParallelConfig(), tensor_parallel=tp, pipeline_parallel=pp)
