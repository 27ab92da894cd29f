"""CLIP similarity (the cosine of the image and text embeddings) of image-text pairs, with a
contrastive checkpoint: a megavlm one (a CLIP / SigLIP stage's, or an HF one converted by
tools/convert_checkpoint.py) or an HF ``CLIPModel`` / ``SiglipModel`` directory, read through the
clip family's state-dict adapter. Used by tools/filter_dataset.py and by a VLM stage's in-loop
``clip_similarity`` metric (eval.clip_model).

The scorer is a whole model on this process (tensor-parallel size 1 over a group of its own), so
it runs beside a model of any layout. Images go through the project's CLIP preprocessing
(data/images.py); an HF model trained with other pixel statistics (SigLIP: mean and std 0.5, from
its preprocessor_config.json) gets its pixels renormalised to them. A megavlm checkpoint's
tokenizer is its recipe's ``data.tokenizer``; an HF directory's is its tokenizer.json (or
sentencepiece model); ``tokenizer`` overrides either.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from megavlm.config.model import ParallelConfig
from megavlm.data.augment import ImageAug
from megavlm.data.images import CLIP_MEAN, CLIP_STD, PILBackend
from megavlm.data.tokenizer import load_tokenizer


class ClipScorer:
    def __init__(self, model, tokenizer, device: torch.device, pixel_stats: tuple | None = None):
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.config = model.model_config
        self.backend = PILBackend(self.config.vision.image_size)
        self.renormalise = None
        if pixel_stats is not None and tuple(map(tuple, pixel_stats)) != (CLIP_MEAN, CLIP_STD):
            mean, std = (torch.tensor(v, dtype=torch.float32).view(3, 1, 1) for v in pixel_stats)
            clip_mean, clip_std = (torch.tensor(v).view(3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
            # CLIP-normalised x -> the model's: ((x * clip_std + clip_mean) - mean) / std
            self.renormalise = (clip_std / std, (clip_mean - mean) / std)

    # ---- loading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, pg_collection, device: torch.device, tokenizer: str | None = None,
             dtype: torch.dtype = torch.float32) -> "ClipScorer":
        """``pg_collection``: the process's groups (entry points only); the scorer takes their
        ``solo`` group as its tensor-parallel group."""
        path = Path(path)
        if (path / "config.json").is_file():
            model, default_tokenizer = _from_hf(path, pg_collection, dtype)
        else:
            model, default_tokenizer = _from_megavlm(path, pg_collection, dtype)
        tokenizer = tokenizer or default_tokenizer
        if tokenizer is None:
            raise FileNotFoundError(f"{path}: no tokenizer found beside the checkpoint; name one")
        model = model.to(device).eval()
        for param in model.parameters():
            param.requires_grad_(False)
        stats = _hf_pixel_stats(path) if (path / "config.json").is_file() else None
        return cls(model, load_tokenizer(tokenizer, require_image_token=False), device, stats)

    # ---- embeddings ------------------------------------------------------------------------
    def decode_images(self, images: list[bytes], sample_ids: list[str]) -> list:
        """Encoded image bytes -> preprocessed [3, S, S] tensors (a BadSample for a bad image)."""
        return self.backend.decode([(data, ImageAug(), sid, sid) for data, sid in zip(images, sample_ids)])

    @torch.no_grad()
    def image_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """[n, 3, S, S] -> L2-normalised [n, E] (fp32, on the CPU)."""
        if not pixels.shape[0]:
            return torch.zeros(0, self.config.contrastive.embed_dim)
        if self.renormalise is not None:
            scale, shift = self.renormalise
            pixels = pixels * scale + shift
        dtype = next(self.model.parameters()).dtype
        return self.model.embed_images(pixels.to(self.device, dtype)).float().cpu()

    def encode_texts(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids, mask), each text [bos] tokens [eos] cut to the encoder's positions; rows
        padded to the longest, or to every position when the model reads the last one (SigLIP)."""
        tok, limit = self.tokenizer, self.config.language.max_seq_len
        rows = [tok.bos_ids + tok.encode(t)[: limit - 1 - len(tok.bos_ids)] + [tok.eos_id] for t in texts]
        length = limit if self.config.contrastive.text_pooling == "last" else max(len(r) for r in rows)
        ids = torch.full((len(rows), length), tok.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        return ids, mask

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """Texts -> L2-normalised [n, E] (fp32, on the CPU)."""
        if not texts:
            return torch.zeros(0, self.config.contrastive.embed_dim)
        ids, mask = self.encode_texts(texts)
        return self.model.embed_texts(ids.to(self.device), mask.to(self.device)).float().cpu()

    def similarity(self, pixels: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Cosine similarity of each image with its text, [n]."""
        return (self.image_embeddings(pixels) * self.text_embeddings(texts)).sum(-1)


def _hf_pixel_stats(path: Path) -> tuple:
    """(mean, std) the HF model was trained with: its preprocessor_config.json, else its class's
    default (SigLIP: 0.5 and 0.5, CLIP: CLIP's)."""
    import json

    preprocessor = path / "preprocessor_config.json"
    if preprocessor.is_file():
        config = json.loads(preprocessor.read_text())
        if "image_mean" in config and "image_std" in config:
            return tuple(config["image_mean"]), tuple(config["image_std"])
    siglip = json.loads((path / "config.json").read_text()).get("model_type") == "siglip"
    return ((0.5,) * 3, (0.5,) * 3) if siglip else (CLIP_MEAN, CLIP_STD)


def _solo(pg_collection):
    """The process's groups with this process alone as the tensor- and pipeline-parallel group."""
    solo = copy.copy(pg_collection)
    solo.tp = solo.pp = pg_collection.solo
    return solo


def _build(model_cfg, pg_collection, dtype):
    from megavlm.models.registry import get_family

    if model_cfg.head != "contrastive":
        raise ValueError(f"a CLIP scorer needs a contrastive (CLIP / SigLIP) checkpoint, not a {model_cfg.family} "
                         f"model with head {model_cfg.head!r}")
    model_cfg = copy.deepcopy(model_cfg)
    model_cfg.vision.tensor_parallel = None   # whole anyway: tensor-parallel size 1
    return get_family("clip").model_cls(model_cfg, ParallelConfig(), _solo(pg_collection), dtype=dtype)


def _from_hf(path: Path, pg_collection, dtype):
    from megavlm.models.common.hf_io import read_hf_dir
    from megavlm.models.registry import family_for_hf
    from megavlm.training.build import load_local_state

    hf_config, hf_state = read_hf_dir(path, dtype)
    family = family_for_hf(hf_config)
    model_cfg = family.config_from_hf(hf_config, flavor=path.name)
    model = _build(model_cfg, pg_collection, dtype)
    load_local_state(model, family.adapter_cls(model_cfg).hf_to_megavlm(hf_state))
    tokenizer = next((p for p in (path / "tokenizer.json", path / "spiece.model", path / "tokenizer.model")
                      if p.is_file()), None)
    return model, tokenizer


def _from_megavlm(path: Path, pg_collection, dtype):
    import yaml

    from megavlm.training.checkpoint import load_model, read_model_config, resolve_checkpoint

    model = _build(read_model_config(path), pg_collection, dtype)
    load_model(model, path, whole_on_every_rank=True)
    recipe = resolve_checkpoint(path) / "recipe.yaml"
    tokenizer = None
    if recipe.is_file():
        tokenizer = (yaml.safe_load(recipe.read_text()).get("data") or {}).get("tokenizer") or None
    return model, tokenizer
