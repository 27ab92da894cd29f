"""Weighted mixtures of sources and curriculum order, as one indexable dataset.

The mixture's order comes from the C++ blended-index builder (``megavlm._C``): every prefix of
it is within one sample per source of the target weights (the reference text's 40/40/20 mix of
captions, instructions and reasoning). A curriculum orders the (mixed) samples by a per-sample
difficulty key instead of shuffling.
"""
from __future__ import annotations

import numpy as np


class MixtureDataset:
    """Virtual sample i -> (source, record): ``size`` slots blended by ``weights``; a source
    smaller than its share wraps around (its samples repeat, in order)."""

    def __init__(self, sources: list, weights: list[float], size: int | None = None, names: list[str] | None = None):
        from megavlm import _C

        if len(sources) != len(weights):
            raise ValueError(f"{len(sources)} sources but {len(weights)} weights")
        self.sources, self.weights = sources, weights
        self.names = names or [f"source{i}" for i in range(len(sources))]
        empty = [n for n, s in zip(self.names, sources) if len(s) == 0]
        if empty:
            raise ValueError(f"mixture source(s) {empty} hold no samples")
        self.size = size or sum(len(s) for s in sources)
        self.dataset_index, self.sample_index = _C.build_blending_indices([float(w) for w in weights], self.size)

    def __len__(self) -> int:
        return self.size

    def locate(self, index: int) -> tuple[int, int]:
        d = int(self.dataset_index[index])
        return d, int(self.sample_index[index]) % len(self.sources[d])

    def __getitem__(self, index: int):
        d, s = self.locate(index)
        return self.sources[d][s]

    def difficulty(self, index: int) -> float:
        d, s = self.locate(index)
        return self.sources[d].difficulty(s)

    def proportions(self, indices) -> np.ndarray:
        counts = np.bincount(np.asarray(self.dataset_index)[np.asarray(indices)], minlength=len(self.sources))
        return counts / max(1, counts.sum())


def curriculum_order(dataset) -> list[int]:
    """Indices sorted easy to hard by ``dataset.difficulty(i)`` (ties keep the dataset order)."""
    keys = [dataset.difficulty(i) for i in range(len(dataset))]
    return sorted(range(len(dataset)), key=lambda i: (keys[i], i))
