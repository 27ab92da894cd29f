"""Placing image embeddings at ``<image>`` positions, with loud count checks: a mismatch between the
number of image tokens and image features is an error naming both counts, never a silent misalignment."""
from __future__ import annotations

import torch


class ImageTokenMismatch(ValueError):
    """The number of <image> placeholders does not match the image embeddings of a sample."""


def images_per_sample_from_counts(counts: list[int], tokens_per_image: int) -> list[int]:
    per_sample = []
    for i, count in enumerate(counts):
        if count % tokens_per_image:
            raise ImageTokenMismatch(
                f"sample {i}: {count} <image> tokens is not a multiple of the {tokens_per_image} "
                f"embeddings one image produces")
        per_sample.append(count // tokens_per_image)
    return per_sample


def check_image_tokens(input_ids: torch.Tensor, image_token_id: int, num_images: int, tokens_per_image: int,
                       images_per_sample=None) -> None:
    """Raise ImageTokenMismatch naming the sample and both counts when they disagree."""
    counts = (input_ids == image_token_id).sum(dim=1).tolist()
    if images_per_sample is None:
        images_per_sample = images_per_sample_from_counts(counts, tokens_per_image)
    per_sample = [int(n) for n in (images_per_sample.tolist() if torch.is_tensor(images_per_sample)
                                   else images_per_sample)]
    if len(per_sample) != len(counts):
        raise ImageTokenMismatch(f"images_per_sample has {len(per_sample)} entries for a batch of {len(counts)} samples")
    for i, (count, n) in enumerate(zip(counts, per_sample)):
        if count != n * tokens_per_image:
            raise ImageTokenMismatch(
                f"sample {i}: {count} <image> tokens in input_ids but {n} image(s) x {tokens_per_image} "
                f"embeddings = {n * tokens_per_image}")
    if sum(per_sample) != num_images:
        raise ImageTokenMismatch(
            f"the batch carries {num_images} images but its samples ask for {sum(per_sample)} (images_per_sample)")


def scatter_image_embeddings(embeddings: torch.Tensor, input_ids: torch.Tensor, image_embeds: torch.Tensor,
                             image_token_id: int, images_per_sample=None) -> torch.Tensor:
    """embeddings [s, b, h] (megatron layout); input_ids [b, s]; image_embeds [n, t, h] in sample
    order. Returns embeddings with each sample's <image> positions replaced, in reading order."""
    num_images, tokens_per_image, hidden = image_embeds.shape
    check_image_tokens(input_ids, image_token_id, num_images, tokens_per_image, images_per_sample)
    mask = (input_ids == image_token_id).unsqueeze(-1)           # [b, s, 1]
    batch_major = embeddings.transpose(0, 1)                      # [b, s, h] view: sample order
    merged = batch_major.masked_scatter(mask, image_embeds.reshape(-1, hidden).to(embeddings.dtype))
    return merged.transpose(0, 1).contiguous()
