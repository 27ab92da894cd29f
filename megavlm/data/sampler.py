"""Deterministic, DP-sharded, resumable order of samples.

Epoch e visits a permutation seeded by (seed, e) (or a fixed curriculum order), cut into global batches (a last incomplete one
is dropped); DP rank r takes its contiguous slice of each global batch, split into micro-batches.
The position is (epoch, global batches done): saved in checkpoints, so a resumed run neither
repeats nor skips a sample.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass
class SamplerState:
    epoch: int = 0
    step_in_epoch: int = 0   # global batches already consumed in this epoch

    def to_dict(self) -> dict:
        return asdict(self)


class GlobalBatchSampler:
    def __init__(self, num_samples: int, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 seed: int = 0, shuffle: bool = True, state: SamplerState | None = None, order: list[int] | None = None):
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(f"global batch {global_batch_size} is not divisible by micro batch {micro_batch_size} "
                             f"x data-parallel size {dp_size}")
        if num_samples < global_batch_size:
            raise ValueError(f"the dataset has {num_samples} samples, fewer than one global batch ({global_batch_size})")
        self.num_samples, self.global_batch_size, self.micro_batch_size = num_samples, global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size, self.seed, self.shuffle = dp_rank, dp_size, seed, shuffle
        self.state = state or SamplerState()
        self.order = torch.tensor(order) if order is not None else None  # a fixed order (curriculum)
        if self.order is not None and len(self.order) != num_samples:
            raise ValueError(f"order has {len(self.order)} entries for {num_samples} samples")

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch_size

    @property
    def micro_batches_per_step(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def _order(self, epoch: int) -> torch.Tensor:
        if self.order is not None:
            return self.order
        if not self.shuffle:
            return torch.arange(self.num_samples)
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))

    def next_step(self) -> list[list[int]]:
        """This rank's micro-batches (lists of sample indices) for the next global batch; advances the state."""
        if self.state.step_in_epoch >= self.steps_per_epoch:
            self.state = SamplerState(self.state.epoch + 1, 0)
        order = self._order(self.state.epoch)
        start = self.state.step_in_epoch * self.global_batch_size
        per_rank = self.global_batch_size // self.dp_size
        mine = order[start + self.dp_rank * per_rank: start + (self.dp_rank + 1) * per_rank].tolist()
        self.state = SamplerState(self.state.epoch, self.state.step_in_epoch + 1)
        m = self.micro_batch_size
        return [mine[i: i + m] for i in range(0, per_rank, m)]
