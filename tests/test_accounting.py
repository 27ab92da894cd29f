"""Throughput accounting counts real tokens and the FLOPs of real samples, packed or padded."""
from __future__ import annotations

import pytest
import torch

from megavlm.data.collate import packed_batches, padded_batches
from megavlm.data.examples import Example
from megavlm.models.registry import flavor_config
from megavlm.training.accounting import count_step
from megavlm.training.flops import sample_flops

SEQ, IMAGE = 48, 56


def _examples(lengths: list[int], images: list[int]) -> list[Example]:
    out = []
    for i, (length, n) in enumerate(zip(lengths, images)):
        ex = Example(f"s{i}", list(range(4, 4 + length)), [-100] * length, [])
        ex.pixels = [torch.zeros(3, IMAGE, IMAGE) for _ in range(n)]
        out.append(ex)
    return out


def test_packed_and_padded_steps_count_the_same_real_work():
    cfg = flavor_config("llava", "debug")
    lengths, images = [5, 19, 1, 30, 12, 7], [1, 0, 0, 2, 1, 1]
    examples = _examples(lengths, images)
    packed = count_step(packed_batches(examples, SEQ, 0, IMAGE), cfg, {"connector", "llm"})
    padded = count_step(padded_batches(examples, 2, 3, SEQ, 0, IMAGE), cfg, {"connector", "llm"})
    assert packed.real_tokens == padded.real_tokens == sum(lengths)
    assert packed.images == padded.images == sum(images)
    assert padded.row_tokens == 6 * SEQ and packed.row_tokens < padded.row_tokens
    assert packed.padding_fraction == pytest.approx(1 - sum(lengths) / packed.row_tokens)
    expected = sum(sample_flops(cfg, n, k, {"connector", "llm"}).total for n, k in zip(lengths, images))
    assert packed.flops == pytest.approx(expected) and padded.flops == pytest.approx(expected)
    # attention is per sample: one row of the same total length would cost more
    assert expected < sample_flops(cfg, sum(lengths), sum(images), {"connector", "llm"}).total
