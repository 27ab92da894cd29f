"""Synthetic LLaVA-style batches of a fixed shape: for tests, parity checks and benchmarks."""
from __future__ import annotations

import torch

from megavlm.config.model import ModelConfig
from megavlm.losses.lm_loss import IGNORE_INDEX

# Raw patch inputs (Fuyu): image i of a sample has grid SYNTHETIC_GRIDS[i] (rows, cols), so a
# sample's images differ in shape.
SYNTHETIC_GRIDS = ((2, 3), (3, 2), (1, 4))


def _placeholders(cfg: ModelConfig, index: int) -> list[int]:
    """Placeholder ids of image ``index`` of a sample: the ViT's tokens, or a grid of raw patches."""
    if cfg.patches is None:
        return [cfg.image_token_id] * cfg.image_tokens
    from megavlm.data.patches import PatchGrid, grid_token_ids

    rows, cols = SYNTHETIC_GRIDS[index % len(SYNTHETIC_GRIDS)]
    p = cfg.patches.patch_size
    return grid_token_ids(PatchGrid(cols * p, rows * p, p), cfg.image_token_id, cfg.patches.newline_token_id)


def _image_inputs(cfg: ModelConfig, layouts: list[list[int]], generator: torch.Generator) -> torch.Tensor:
    """Random model inputs of the images: ViT pixels [n, 3, S, S], or raw patches [patches, 3 * p * p]."""
    if cfg.patches is None:
        size = cfg.vision.image_size
        return torch.randn(len(layouts), 3, size, size, generator=generator)
    patches = sum(ids.count(cfg.image_token_id) for ids in layouts)
    return torch.randn(patches, cfg.patches.patch_dim, generator=generator)


def image_positions(cfg: ModelConfig, num_images: int) -> int:
    """Sequence positions the first ``num_images`` synthetic images of a sample fill."""
    return sum(len(_placeholders(cfg, i)) for i in range(num_images))


def synthetic_sample(cfg: ModelConfig, seq_length: int, num_images: int, generator: torch.Generator,
                     prompt_tokens: int = 4, length: int | None = None) -> dict:
    """One sample: [prompt, image placeholders (per image), answer ...], labels on the answer
    only (already shifted: labels[t] is the target after token t). With ``length`` the sample ends
    there and the row is padded (token 0, no labels) up to ``seq_length``. ``prefix_length``:
    the positions before the answer (prefix-LM attention)."""
    vocab = cfg.language.vocab_size
    layouts = [_placeholders(cfg, i) for i in range(num_images)]
    placeholders = sum(len(ids) for ids in layouts)
    if seq_length - placeholders < prompt_tokens + 2:
        raise ValueError(f"seq_length {seq_length} is too short for {num_images} image(s) of {placeholders} positions")
    ids = torch.randint(4, vocab, (seq_length,), generator=generator)
    specials = [cfg.image_token_id] + ([cfg.patches.newline_token_id] if cfg.patches is not None else [])
    for token in specials:   # text never holds an image placeholder
        ids[ids == token] = token + 1 if token + 1 < vocab and token + 1 not in specials else 4
    start = prompt_tokens
    for image_ids in layouts:
        ids[start: start + len(image_ids)] = torch.tensor(image_ids)
        start += len(image_ids)
    answer_start = start
    labels = torch.full((seq_length,), IGNORE_INDEX, dtype=torch.long)
    labels[answer_start - 1: -1] = ids[answer_start:]
    length = seq_length if length is None else length
    if not answer_start + 1 <= length <= seq_length:
        raise ValueError(f"sample length {length} must hold the prompt and image tokens ({answer_start}) and fit "
                         f"seq_length {seq_length}")
    ids[length:] = 0
    labels[length - 1:] = IGNORE_INDEX
    pixels = _image_inputs(cfg, layouts, generator)
    return {"input_ids": ids, "labels": labels, "images": pixels, "num_images": pixels.shape[0], "length": length,
            "prefix_length": answer_start}


def collate(samples: list[dict], prefix_lm: bool = False) -> dict:
    batch = {
        "input_ids": torch.stack([s["input_ids"] for s in samples]),
        "labels": torch.stack([s["labels"] for s in samples]),
        "images": torch.cat([s["images"] for s in samples]),
        "images_per_sample": torch.tensor([s["num_images"] for s in samples], dtype=torch.long),
        "sample_lengths": [s["length"] for s in samples],
        "sample_images": [s["num_images"] for s in samples],
    }
    if prefix_lm:
        batch["prefix_lengths"] = torch.tensor([s["prefix_length"] for s in samples], dtype=torch.long)
    return batch


def synthetic_batches(cfg: ModelConfig, num_samples: int, seq_length: int, micro_batch_size: int = 1, seed: int = 0,
                      image_pattern: tuple[int, ...] = (1, 2, 0, 1), device=None, fill: float = 1.0) -> list[dict]:
    """Micro-batches of ``micro_batch_size`` covering ``num_samples`` samples; sample i carries
    ``image_pattern[i % len]`` images (so multi-image and text-only samples appear). ``fill`` < 1
    makes every sample that share of the row long, the rest padding. Prefix-LM models' batches
    carry each sample's prefix length."""
    if num_samples % micro_batch_size:
        raise ValueError(f"{num_samples} samples do not split into micro-batches of {micro_batch_size}")
    gen = torch.Generator().manual_seed(seed)
    length = None if fill >= 1.0 else max(1, round(fill * seq_length))
    samples = [synthetic_sample(cfg, seq_length, image_pattern[i % len(image_pattern)], gen, length=length)
               for i in range(num_samples)]
    batches = [collate(samples[i: i + micro_batch_size], cfg.prefix_lm)
               for i in range(0, num_samples, micro_batch_size)]
    if device is not None:
        batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
    return batches


def synthetic_pairs(cfg: ModelConfig, num_pairs: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """Image-text pairs for a contrastive model: images, and texts of different lengths, each
    ending with the end-of-text token (once) and padded with token 0; texts read at their last
    position (SigLIP) fill the whole row of language.max_seq_len tokens instead."""
    g = torch.Generator().manual_seed(seed)
    size, length, vocab = cfg.vision.image_size, cfg.language.max_seq_len, cfg.language.vocab_size
    eot = cfg.contrastive.eot_token_id if cfg.contrastive.eot_token_id is not None else vocab - 1
    ids = torch.randint(3, vocab, (num_pairs, length), generator=g)
    ids[ids == eot] = 3
    mask = torch.ones_like(ids)
    if cfg.contrastive.text_pooling != "last":
        for row in range(num_pairs):
            n = int(torch.randint(2, length + 1, (1,), generator=g)) if row else length
            ids[row, n - 1], ids[row, n:], mask[row, n:] = eot, 0, 0
    images = torch.randn(num_pairs, 3, size, size, generator=g).to(dtype)
    return {"images": images, "text_ids": ids, "text_mask": mask}
