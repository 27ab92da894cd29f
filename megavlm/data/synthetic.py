"""Synthetic LLaVA-style batches of a fixed shape: for tests, parity checks and benchmarks."""
from __future__ import annotations

import torch

from megavlm.config.model import ModelConfig
from megavlm.losses.lm_loss import IGNORE_INDEX


def synthetic_sample(cfg: ModelConfig, seq_length: int, num_images: int, generator: torch.Generator,
                     prompt_tokens: int = 4) -> dict:
    """One sample: [prompt, <image> x tokens per image (per image), answer ...], labels on the
    answer only (already shifted: labels[t] is the target after token t)."""
    image_tokens = cfg.image_tokens
    vocab = cfg.language.vocab_size
    text = seq_length - num_images * image_tokens
    if text < prompt_tokens + 2:
        raise ValueError(f"seq_length {seq_length} is too short for {num_images} image(s) of {image_tokens} tokens")
    ids = torch.randint(4, vocab, (seq_length,), generator=generator)
    ids[ids == cfg.image_token_id] = cfg.image_token_id + 1 if cfg.image_token_id + 1 < vocab else 4
    start = prompt_tokens
    for i in range(num_images):
        ids[start + i * image_tokens: start + (i + 1) * image_tokens] = cfg.image_token_id
    answer_start = start + num_images * image_tokens
    labels = torch.full((seq_length,), IGNORE_INDEX, dtype=torch.long)
    labels[answer_start - 1: -1] = ids[answer_start:]
    size = cfg.vision.image_size
    images = torch.randn(num_images, 3, size, size, generator=generator)
    return {"input_ids": ids, "labels": labels, "images": images, "num_images": num_images}


def collate(samples: list[dict]) -> dict:
    return {
        "input_ids": torch.stack([s["input_ids"] for s in samples]),
        "labels": torch.stack([s["labels"] for s in samples]),
        "images": torch.cat([s["images"] for s in samples]),
        "images_per_sample": torch.tensor([s["num_images"] for s in samples], dtype=torch.long),
    }


def synthetic_batches(cfg: ModelConfig, num_samples: int, seq_length: int, micro_batch_size: int = 1, seed: int = 0,
                      image_pattern: tuple[int, ...] = (1, 2, 0, 1), device=None) -> list[dict]:
    """Micro-batches of ``micro_batch_size`` covering ``num_samples`` samples; sample i carries
    ``image_pattern[i % len]`` images (so multi-image and text-only samples appear)."""
    if num_samples % micro_batch_size:
        raise ValueError(f"{num_samples} samples do not split into micro-batches of {micro_batch_size}")
    gen = torch.Generator().manual_seed(seed)
    samples = [synthetic_sample(cfg, seq_length, image_pattern[i % len(image_pattern)], gen) for i in range(num_samples)]
    batches = [collate(samples[i: i + micro_batch_size]) for i in range(0, num_samples, micro_batch_size)]
    if device is not None:
        batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    return batches
