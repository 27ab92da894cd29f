"""The recipe reference (docs/recipes.md), generated from the config dataclasses.

Each key's text is the comment on its line in megavlm/config/*.py, else the comment block just above
it, else its entry in ``KEY_HELP``; a key with none is an error, so a new key cannot go undocumented
(tests/test_docs.py). Regenerate with ``python -m megavlm.config.reference > docs/recipes.md``.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import typing

from megavlm.config.recipe import Recipe

FIELD_LINE = re.compile(r"^    (\w+): [^=]+?(?:= .*?)?(?:\s+#\s*(.*))?$")

KEY_HELP: dict[str, str] = {  # keys whose field has no comment in megavlm/config/
    "model.family": "model family: its model, flavors and HF adapter live in megavlm/models/<family>/",
    "model.flavor": "a preset of the family (debug, llava-1b, llava-1.5-7b, internvl3-1b, fuyu-8b, "
                    "paligemma-3b-224, clip-vit-l-14-336, ...); the other model keys override it",
    "model.image_std": "per-channel pixel standard deviation (with model.image_mean)",
    "model.patches.patch_size": "pixels per patch side (Fuyu-8B: 30)",
    "model.patches.max_height": "larger images are scaled down, aspect kept, to fit this height ...",
    "model.patches.max_width": "... and this width (Fuyu-8B: 1080 x 1920)",
    "model.image_token_id": "token id of `<image>` in the tokenizer (checked against data.tokenizer at start; unused by head: contrastive)",
    "model.init_std": "std of the normal initialisation of weights not loaded from a checkpoint",
    "model.vision.image_size": "input resolution (pixels per side)",
    "model.vision.patch_size": "ViT patch size; image_size must be a multiple",
    "model.vision.hidden_size": "ViT width",
    "model.vision.num_layers": "ViT layers in the pretrained model (only those up to feature_layer are built)",
    "model.vision.num_heads": "ViT attention heads",
    "model.vision.ffn_hidden_size": "ViT MLP width",
    "model.vision.activation": "ViT MLP activation (CLIP: quick_gelu; SigLIP: gelu_tanh, GELU's tanh approximation)",
    "model.vision.norm_eps": "LayerNorm/RMSNorm epsilon of the ViT",
    "model.vision.class_token": "the ViT has a class token",
    "model.vision.patch_bias": "bias on the patch-embedding convolution",
    "model.vision.normalization": "ViT norm type",
    "model.vision.layer_scale": "InternViT LayerScale initial value (null: no LayerScale)",
    "model.language.vocab_size": "LLM vocabulary (at least the tokenizer's size; padded for TP internally)",
    "model.language.hidden_size": "LLM width",
    "model.language.num_layers": "LLM decoder layers",
    "model.language.num_heads": "LLM attention heads",
    "model.language.ffn_hidden_size": "LLM MLP width",
    "model.language.max_seq_len": "longest sequence (learned position embeddings; RoPE tables)",
    "model.language.rope_theta": "RoPE base",
    "model.language.norm_eps": "LLM norm epsilon",
    "model.language.normalization": "LLM norm type",
    "model.language.activation": "LLM MLP activation (swiglu: gated, Llama/Qwen2; CLIP's text encoder: quick_gelu, SigLIP's: gelu_tanh)",
    "model.language.position_embedding": "rope (Llama, Qwen2) or learned absolute (OPT)",
    "model.language.qkv_bias": "bias on the QKV projection (Qwen2)",
    "model.language.linear_bias": "bias on the other linears (OPT)",
    "model.language.tie_embeddings": "the output layer shares the input embedding",
    "model.connector.bias": "biases in the connector's linears",
    "model.qformer.hidden_size": "Q-Former width (BERT-base: 768)",
    "model.qformer.num_layers": "Q-Former layers",
    "model.qformer.num_heads": "Q-Former attention heads",
    "model.qformer.ffn_hidden_size": "Q-Former MLP width",
    "model.qformer.num_query_tokens": "learned queries: the image tokens the LLM sees",
    "model.qformer.cross_attention_freq": "a cross-attention to the image features every N layers",
    "model.qformer.vocab_size": "the Q-Former's text vocabulary (BERT's + [DEC])",
    "model.qformer.max_position_embeddings": "longest Q-Former text",
    "model.qformer.norm_eps": "Q-Former LayerNorm epsilon",
    "model.flamingo.num_latents": "Perceiver latents per image",
    "model.flamingo.resampler_depth": "Perceiver resampler layers",
    "model.flamingo.resampler_heads": "resampler attention heads",
    "model.flamingo.resampler_head_dim": "resampler head size",
    "model.kernels.cross_entropy": "vocab-parallel cross-entropy: torch, or the Triton kernel (kernels/)",
    "model.kernels.loss_chunk_tokens": "tokens per chunk of the fused output layer + loss",
    "parallel.tensor_parallel": "tensor-parallel size (the ViT is sharded at the same size)",
    "parallel.pipeline_parallel": "pipeline stages over the LLM's layers (vision and connector on the first)",
    "parallel.sequence_parallel": "sequence parallelism in the TP region (norms and dropout on sequence shards)",
    "parallel.last_stage_layers": "decoder layers on the last pipeline stage (null: even split)",
    "stage.name": "the stage's name in logs, checkpoints and the summary",
    "stage.trainable": "components that train: vision, connector, fusion, llm, lora, text (a contrastive model's text encoder); the rest is frozen",
    "stage.weight_decay": "per-component weight decay (same keys as stage.lr)",
    "stage.lora.rank": "adapter rank r",
    "stage.lora.alpha": "adapter scale is alpha / rank",
    "stage.lora.dropout": "dropout on the adapter input",
    "optimizer.lr": "peak learning rate (Adam)",
    "optimizer.weight_decay": "decoupled weight decay (never on biases and norms)",
    "optimizer.beta1": "Adam beta1",
    "optimizer.beta2": "Adam beta2",
    "optimizer.eps": "Adam epsilon",
    "optimizer.clip_grad": "global gradient-norm clip (0: none)",
    "optimizer.schedule": "LR decay after warm-up",
    "optimizer.warmup_steps": "linear warm-up steps (else warmup_ratio)",
    "data.format": "captions (JSONL image+caption), conversations (LLaVA JSON), interleaved (JSONL documents) or shards (webdataset index)",
    "data.validation": "held-out file of the same format: val/loss at the end (and every train.eval_interval)",
    "data.test": "a test file of the same format (kept with the recipe; the metrics use eval.*)",
    "data.tokenizer": "sentencepiece .model file or a tokenizer.json directory",
    "data.template": "chat template: plain, vicuna_v1, llama3, chatml (labels on assistant turns only)",
    "data.tile_thumbnail": "with several tiles, also a thumbnail of the whole image",
    "data.shuffle": "shuffle each epoch (seeded by train.seed; resumable)",
    "data.sources[].path": "the source's file or shard index",
    "data.sources[].format": "the source's format (as data.format)",
    "data.sources[].weight": "its share of each epoch's samples",
    "data.sources[].root": "image folder of the source (default: its file's folder)",
    "data.sources[].name": "name in logs",
    "data.augment.enabled": "turn the augmentation on",
    "data.augment.crop_scale": "RandomResizedCrop area range [low, high]",
    "data.augment.jitter": "brightness/contrast jitter strength",
    "data.augment.flip_prob": "probability of a horizontal flip",
    "train.global_batch_size": "samples per optimizer step over all data-parallel ranks",
    "train.micro_batch_size": "samples per forward/backward; gradient accumulation makes up the global batch",
    "train.seq_length": "tokens per sample (image tokens included); longer samples are skipped and counted",
    "train.epochs": "passes over the training data (when max_steps is unset)",
    "train.dtype": "parameter/compute dtype (fp32 main grads and optimizer state either way)",
    "train.recompute": "activation recomputation of the transformer layers",
    "train.seed": "seed of initialisation, data order and dropout",
    "train.log_interval": "steps between printed progress lines",
    "checkpoint.dir": "where step_N checkpoints, final_metrics.json and TensorBoard logs go (empty: no checkpoints)",
    "checkpoint.save_every_epoch": "save at the end of each epoch",
    "checkpoint.keep_last": "keep the last K checkpoints",
    "checkpoint.keep_best": "also keep the best K by best_metric",
    "checkpoint.best_metric": "validation metric that ranks checkpoints, e.g. val/loss",
    "checkpoint.best_mode": "min or max of best_metric is best",
    "logging.tensorboard": "write TensorBoard scalars",
    "eval.max_samples": "held-out samples per metric",
    "eval.max_new_tokens": "greedy generation length for VQA",
    "eval.few_shot": "shot counts for eval.few_shot_captions",
}


def _field_comments(cls) -> dict[str, str]:
    """field name -> its comment (same line, else the block of comment lines directly above)."""
    comments, block = {}, []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            block.append(stripped.lstrip("#").strip())
            continue
        match = FIELD_LINE.match(line)
        if match and not stripped.startswith(("def ", "return ", "@")):
            name, inline = match.group(1), match.group(2)
            text = " ".join(block + ([inline] if inline else []))
            if text:
                comments[name] = text
        block = []
    return comments


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return " | ".join(repr(a).replace("'", "") for a in args)
    if origin is typing.Union:
        names = [_type_name(a) for a in args if a is not type(None)]
        return " | ".join(names) + " (or null)"
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if dataclasses.is_dataclass(value):
            return "(section)"
    else:
        return "required"
    return "null" if value is None else f"`{value!r}`".replace("'", '"') if value != "" else '`""`'


def _section_class(tp):
    for candidate in (tp, *typing.get_args(tp)):
        if dataclasses.is_dataclass(candidate):
            return candidate
        if typing.get_origin(candidate) is list:
            inner = typing.get_args(candidate)[0]
            if dataclasses.is_dataclass(inner):
                return inner
    return None


def collect(cls=Recipe, prefix: str = "") -> list[tuple[str, type, list[tuple[str, str, str, str | None]]]]:
    """[(section key, its class, [(key, type, default, text or None), ...]), ...] depth-first."""
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    rows, sections = [], []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        sub = _section_class(hints[f.name])
        if sub is not None:
            suffix = "[]" if typing.get_origin(hints[f.name]) is list else ""
            sections += collect(sub, f"{key}{suffix}.")
            if prefix:  # a nested section is itself a key of its parent
                rows.append((key, f"section: {sub.__name__}", _default(f), comments.get(f.name) or KEY_HELP.get(key)
                             or " ".join((inspect.getdoc(sub) or "").split()) or None))
            continue
        rows.append((key, _type_name(hints[f.name]), _default(f), comments.get(f.name) or KEY_HELP.get(key)))
    return ([(prefix.rstrip("."), cls, rows)] if rows else []) + sections


def undocumented() -> list[str]:
    return [key for _, _, rows in collect() for key, _, _, text in rows if not text]


def render() -> str:
    out = ["# Recipe reference", "",
           "Generated from the config dataclasses (`megavlm/config/recipe.py`, `megavlm/config/model.py`) by",
           "`python -m megavlm.config.reference > docs/recipes.md`; `tests/test_docs.py` fails when a key has no",
           "text or this file is stale. A recipe is a YAML file of these sections; `key=value` on the command line",
           "overrides any key (`train.max_steps=20`, `model.language.num_layers=4`). Unknown keys and bad values",
           "are errors naming the key and the file. Under `model`, `family` + `flavor` pick a preset",
           "(`megavlm/models/<family>/__init__.py`) and every other key overrides it.", ""]
    for section, cls, rows in collect():
        if not section:
            continue
        doc = inspect.getdoc(cls) or ""
        out += [f"## `{section}`", ""] + ([doc.replace("\n", " "), ""] if doc and not doc.startswith(cls.__name__ + "(") else [])
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for key, tp, default, text in rows:
            out.append(f"| `{key}` | {tp.replace('|', '&#124;')} | {default.replace('|', '&#124;')} | "
                       f"{(text or 'UNDOCUMENTED').replace('|', '&#124;')} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    missing = undocumented()
    if missing:
        print("undocumented recipe keys (add a comment on the field or a KEY_HELP entry): " + ", ".join(missing),
              file=sys.stderr)
    sys.stdout.write(render())
    sys.exit(1 if missing else 0)
