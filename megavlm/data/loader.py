"""Micro-batches for the trainer: fixed-shape collation, skipped-sample accounting, workers.

Every micro-batch has exactly ``micro_batch_size`` rows of ``seq_length`` tokens (pipeline
stages exchange fixed shapes): short samples are right-padded with labels -100, and a bad sample
is replaced by an all-padding row that carries no supervised token. Skips are counted by reason
in ``SkipCounter`` (logged and saved with checkpoints); the run stops with an error naming the
last bad sample only when the configured skip budget is exceeded.
"""
from __future__ import annotations

import collections

import torch

from megavlm.data.templates import BadSample
from megavlm.losses.lm_loss import IGNORE_INDEX


class SkipBudgetExceeded(RuntimeError):
    pass


class SkipCounter:
    def __init__(self, max_fraction: float = 0.01, min_budget: int = 10):
        self.counts: collections.Counter = collections.Counter()
        self.seen = 0
        self.max_fraction, self.min_budget = max_fraction, min_budget

    def update(self, seen: int, reason_counts: dict[str, int], last_message: str = "") -> None:
        """Add one step's skips (already summed over data-parallel ranks); raise over budget."""
        self.seen += seen
        self.counts.update({r: n for r, n in reason_counts.items() if n})
        total = sum(self.counts.values())
        budget = max(self.min_budget, self.max_fraction * self.seen)
        if any(reason_counts.values()) and total > budget:
            raise SkipBudgetExceeded(
                f"{total} of {self.seen} samples were skipped ({dict(self.counts)}), over the budget of {budget:.0f} "
                f"(data.max_skip_fraction={self.max_fraction})" + (f"; last: {last_message}" if last_message else ""))

    def state_dict(self) -> dict:
        return {"counts": dict(self.counts), "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.counts = collections.Counter(state.get("counts", {}))
        self.seen = int(state.get("seen", 0))


class SafeDataset(torch.utils.data.Dataset):
    """Turns a BadSample into a marker the collate function accounts for."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            return self.dataset[index]
        except BadSample as err:
            return {"skipped": (err.reason, str(err))}


class FixedShapeCollate:
    def __init__(self, seq_length: int, pad_id: int, image_size: int):
        self.seq_length, self.pad_id, self.image_size = seq_length, pad_id, image_size

    def __call__(self, samples: list[dict]) -> dict:
        n, s = len(samples), self.seq_length
        input_ids = torch.full((n, s), self.pad_id, dtype=torch.long)
        labels = torch.full((n, s), IGNORE_INDEX, dtype=torch.long)
        images, per_sample, skipped, ids = [], [], [], []
        for row, sample in enumerate(samples):
            if "skipped" in sample:
                skipped.append(sample["skipped"])
                per_sample.append(0)
                ids.append(None)
                continue
            length = len(sample["input_ids"])
            input_ids[row, :length] = torch.tensor(sample["input_ids"])
            labels[row, :length] = torch.tensor(sample["labels"])
            images.append(sample["images"])
            per_sample.append(sample["images"].shape[0])
            ids.append(sample["id"])
        return {
            "input_ids": input_ids, "labels": labels,
            "images": torch.cat(images) if images else torch.zeros(0, 3, self.image_size, self.image_size),
            "images_per_sample": torch.tensor(per_sample, dtype=torch.long),
            "sample_ids": ids, "skipped": skipped,
        }


class StepLoader:
    """Yields, per training step, this rank's list of micro-batches (collated)."""

    def __init__(self, dataset, sampler, collate: FixedShapeCollate, num_workers: int = 0):
        self.sampler, self.collate = sampler, collate
        self.safe = SafeDataset(dataset)
        self.num_workers = num_workers
        self._pool = None

    def _load(self, indices: list[int]) -> dict:
        return self.collate([self.safe[i] for i in indices])

    def next_step(self) -> list[dict]:
        micro = self.sampler.next_step()
        if self.num_workers == 0:
            return [self._load(ix) for ix in micro]
        if self._pool is None:
            import concurrent.futures
            self._pool = concurrent.futures.ThreadPoolExecutor(self.num_workers)
        return list(self._pool.map(self._load, micro))
