"""What a training step really processed: tokens that are not padding, ViT inputs, and the model
FLOPs of those samples, summed over micro-batches and data-parallel ranks. Throughput and MFU
are computed from these, so padding or packing never inflates them."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megavlm.training.flops import batch_flops


@dataclass(frozen=True)
class StepCounts:
    real_tokens: int      # tokens of real samples (what tokens/s reports)
    row_tokens: int       # tokens of the rows the model ran, padding included
    images: int           # ViT inputs (tiles counted one by one)
    flops: float          # model FLOPs of the real samples

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.real_tokens / self.row_tokens if self.row_tokens else 0.0


def _sizes(batch: dict) -> tuple[list[int], list[int], int]:
    rows = batch["input_ids"] if "input_ids" in batch else batch["text_ids"]
    if "sample_lengths" in batch:
        return batch["sample_lengths"], batch["sample_images"], rows.numel()
    # synthetic batches: every row is one whole sample
    return [rows.shape[1]] * rows.shape[0], batch["images_per_sample"].tolist(), rows.numel()


def count_step(batches: list[dict], model_cfg, trainable: set[str], dp_group=None, device=None) -> StepCounts:
    """This rank's micro-batches, summed over ``dp_group`` (one small all-reduce on ``device``)."""
    totals = torch.zeros(4, dtype=torch.float64)
    for batch in batches:
        lengths, images, row_tokens = _sizes(batch)
        totals += torch.tensor([sum(lengths), row_tokens, sum(images), batch_flops(model_cfg, lengths, images, trainable)],
                               dtype=torch.float64)
    if dp_group is not None and dist.is_initialized() and dist.get_world_size(dp_group) > 1:
        totals = totals.to(device or "cpu")
        dist.all_reduce(totals, group=dp_group)
    real, rows, images, flops = totals.tolist()
    return StepCounts(int(real), int(rows), int(images), flops)
