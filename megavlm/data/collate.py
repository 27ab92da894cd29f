"""Micro-batches of fixed shape: padded rows, or samples packed into token budgets.

Padded: ``micro_batch_size`` rows of ``seq_length`` tokens, labels -100 on padding; a skipped
sample becomes an all-padding row (no supervised token), so shapes never change (pipeline stages
exchange fixed shapes).

Packed: samples are assigned to rows of ``seq_length`` tokens by the C++ best-fit packer
(``megavlm._C``); each row is a micro-batch of one sequence in megatron-core's THD layout, with
position ids restarting per sample and ``cu_seqlens`` so attention never crosses samples (the
padding tail is its own segment). A sample's loss terms are unchanged by packing.

Prefix-LM models (``prefix_lm``) also get each row's (or packed segment's) prefix length: the
tokens before its first supervised one (models/common/prefix_lm.py).

``image_size`` is the ViT's input side, or, for raw patch inputs (data/patches.py), the shape of
one patch input ``(3 * p * p,)``: what an empty batch's image tensor is shaped like.
"""
from __future__ import annotations

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megavlm.losses.lm_loss import IGNORE_INDEX
from megavlm.models.common.prefix_lm import prefix_length


def image_inputs(pixels: torch.Tensor) -> torch.Tensor:
    """One decoded image as model inputs: [views, 3, S, S] for a ViT (a tiled image gives
    several views), or as it is for raw patches ([patches, 3 * p * p])."""
    return pixels if pixels.dim() == 2 else pixels.reshape(-1, *pixels.shape[-3:])


def _images(examples, image_size) -> torch.Tensor:
    """Every image input of the examples in order."""
    tensors = [image_inputs(t) for ex in examples for t in ex.pixels]
    if tensors:
        return torch.cat(tensors)
    return torch.zeros(0, *image_size) if isinstance(image_size, tuple) else torch.zeros(0, 3, image_size, image_size)


def vit_inputs(example) -> int:
    """Image inputs of one example: its images, tiles (or raw patches) counted one by one."""
    return sum(image_inputs(t).shape[0] for t in example.pixels)


def pad_micro_batch(examples: list, rows: int, seq_length: int, pad_id: int, image_size, prefix_lm: bool = False
                    ) -> dict:
    input_ids = torch.full((rows, seq_length), pad_id, dtype=torch.long)
    labels = torch.full((rows, seq_length), IGNORE_INDEX, dtype=torch.long)
    for row, ex in enumerate(examples):
        input_ids[row, : len(ex)] = torch.tensor(ex.input_ids)
        labels[row, : len(ex)] = torch.tensor(ex.labels)
    per_sample = [vit_inputs(ex) for ex in examples] + [0] * (rows - len(examples))
    batch = {"input_ids": input_ids, "labels": labels, "images": _images(examples, image_size),
             "images_per_sample": torch.tensor(per_sample, dtype=torch.long),
             "sample_ids": [ex.sample_id for ex in examples], **sample_sizes(examples)}
    if prefix_lm:  # an all-padding row has no prefix: causal (its outputs are never used)
        batch["prefix_lengths"] = torch.tensor([prefix_length(ex.labels) for ex in examples]
                                               + [0] * (rows - len(examples)), dtype=torch.long)
    return batch


def sample_sizes(examples: list) -> dict:
    """Real tokens and ViT inputs of each sample in a micro-batch (throughput and FLOPs count
    these, never the padding)."""
    return {"sample_lengths": [len(ex) for ex in examples], "sample_images": [vit_inputs(ex) for ex in examples]}


def padded_batches(examples: list, micro_batch_size: int, num_micro_batches: int, seq_length: int, pad_id: int,
                   image_size, prefix_lm: bool = False) -> list[dict]:
    return [pad_micro_batch(examples[i * micro_batch_size:(i + 1) * micro_batch_size], micro_batch_size, seq_length,
                            pad_id, image_size, prefix_lm) for i in range(num_micro_batches)]


def pack_row(examples: list, seq_length: int, pad_id: int, image_size, prefix_lm: bool = False) -> dict:
    ids, labels, positions, bounds = [], [], [], [0]
    for ex in examples:
        ids += ex.input_ids
        labels += ex.labels
        positions += list(range(len(ex)))
        bounds.append(len(ids))
    pad = seq_length - len(ids)
    if pad:
        ids += [pad_id] * pad
        labels += [IGNORE_INDEX] * pad
        positions += list(range(pad))
        bounds.append(seq_length)
    cu = torch.tensor(bounds, dtype=torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                             max_seqlen_kv=longest)
    batch = {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
             "position_ids": torch.tensor([positions]), "images": _images(examples, image_size),
             "images_per_sample": torch.tensor([sum(vit_inputs(ex) for ex in examples)], dtype=torch.long),
             "packed_seq_params": params, "sample_ids": [ex.sample_id for ex in examples], **sample_sizes(examples)}
    if prefix_lm:  # one per cu_seqlens segment; the padding tail is causal
        batch["prefix_lengths"] = torch.tensor([prefix_length(ex.labels) for ex in examples] + [0] * bool(pad),
                                               dtype=torch.long)
    return batch


def packed_batches(examples: list, seq_length: int, pad_id: int, image_size, prefix_lm: bool = False) -> list[dict]:
    """One micro-batch (a packed row) per bin; deterministic for the same examples."""
    from megavlm import _C

    if not examples:  # every sample skipped: one all-padding row keeps this rank in the step's collectives
        return [pack_row([], seq_length, pad_id, image_size, prefix_lm)]
    bins = _C.pack_best_fit([len(ex) for ex in examples], seq_length)
    return [pack_row([examples[i] for i in sorted(b)], seq_length, pad_id, image_size, prefix_lm) for b in bins]


def padding_fraction(lengths: list[int], seq_length: int, micro_batch_size: int, packed: bool) -> float:
    """Share of padding tokens: fixed-shape padded micro-batches vs packed rows."""
    from megavlm import _C

    tokens = sum(lengths)
    if packed:
        rows = len(_C.pack_best_fit(lengths, seq_length))
        return 1 - tokens / (rows * seq_length)
    rows = -(-len(lengths) // micro_batch_size) * micro_batch_size
    return 1 - tokens / (rows * seq_length)


def text_micro_batch(examples: list, rows: int, text_length: int, pad_id: int, image_size: int) -> dict:
    """Q-Former batches: one image and one text per row; skipped rows are dropped (no pipeline
    stages here, and ITC/ITM need real pairs)."""
    text_ids = torch.full((len(examples), text_length), pad_id, dtype=torch.long)
    text_mask = torch.zeros(len(examples), text_length, dtype=torch.long)
    for row, ex in enumerate(examples):
        text_ids[row, : len(ex)] = torch.tensor(ex.input_ids)
        text_mask[row, : len(ex)] = 1
    return {"images": _images(examples, image_size), "text_ids": text_ids, "text_mask": text_mask,
            "images_per_sample": torch.ones(len(examples), dtype=torch.long),
            "sample_ids": [ex.sample_id for ex in examples], **sample_sizes(examples)}


def text_batches(examples: list, micro_batch_size: int, num_micro_batches: int, text_length: int, pad_id: int,
                 image_size: int) -> list[dict]:
    """Always ``num_micro_batches`` micro-batches; with skipped samples the last ones are shorter
    or empty (a contrastive step gathers every micro-batch over data-parallel ranks, so each rank
    runs the same number)."""
    chunks = [examples[i * micro_batch_size:(i + 1) * micro_batch_size] for i in range(num_micro_batches)]
    return [text_micro_batch(c, micro_batch_size, text_length, pad_id, image_size) for c in chunks]
