"""Record -> training example: token ids, shifted labels, the image bytes and their augmentation.

Chat records (captions, conversations) go through a chat template (labels on assistant turns
only); interleaved documents are supervised on their text, with each image at its place in the
reading order. ``<image>`` becomes the model's number of image tokens per image.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from megavlm.data.augment import ImageAug, augment_record
from megavlm.data.records import Record
from megavlm.data.templates import BadSample, ConversationEncoder, shifted_labels
from megavlm.data.tokenizer import IMAGE_TOKEN


@dataclass
class Example:
    sample_id: str
    input_ids: list[int]
    labels: list[int]
    images: list[tuple[bytes, ImageAug, str]]   # (encoded bytes, augmentation, source for messages)
    pixels: list = field(default_factory=list)  # decoded [3, S, S] tensors, filled by the loader
    notes: list = field(default_factory=list)   # (reason, message): kept despite a problem (unrepresentable text)

    def __len__(self) -> int:
        return len(self.input_ids)


class ExampleBuilder:
    def __init__(self, encoder: ConversationEncoder, seq_length: int, augment=None, seed: int = 0,
                 end_of_chunk: str | None = None, max_images: int | None = None, tiler=None,
                 drop_images: bool = False):
        self.encoder, self.seq_length = encoder, seq_length
        self.drop_images = drop_images       # text only: images and <image> tags removed
        self.tiler = tiler                   # each image's layout from its size: InternVL tiles, Fuyu patch grids
        self.max_images = max_images         # a model's limit per sample (Flamingo's max_media)
        self.augment, self.seed = augment, seed
        self.end_of_chunk = end_of_chunk   # interleaved: a marker after each text chunk (Flamingo's <|endofchunk|>)

    def _interleaved(self, record: Record, transform, views) -> tuple[list[int], list[bool]]:
        enc, tok = self.encoder, self.encoder.tok
        ids = list(tok.bos_ids)
        sup = [False] * len(ids)
        for kind, value in record.segments:
            if kind == "image":
                image = enc.image_ids(next(views))
                ids += image
                sup += [False] * len(image)
                continue
            if IMAGE_TOKEN in value:
                raise BadSample("image_tag_mismatch", f"sample {record.sample_id}: an interleaved text chunk contains "
                                                      f"{IMAGE_TOKEN}; images are content items")
            text = transform(value) if transform else value
            piece = tok.encode(text) + (tok.encode_marker(self.end_of_chunk) if self.end_of_chunk else [])
            ids += piece
            sup += [True] * len(piece)
        ids.append(tok.eos_id)
        sup.append(True)
        return ids, sup

    def build(self, record: Record, index: int, epoch: int) -> Example:
        if self.drop_images:
            record = without_images(record)
        if self.max_images is not None and len(record.images) > self.max_images:
            raise BadSample("too_many_images", f"sample {record.sample_id}: {len(record.images)} images, the model "
                                               f"takes at most {self.max_images} per sample")
        augs, transform = augment_record(record, self.augment, self.seed, epoch, index)
        data = [ref.read(record.sample_id) for ref in record.images]
        views = [1] * len(data)
        if self.tiler is not None:
            planned = [self.tiler.plan(d, aug, record.sample_id, ref.source) for d, aug, ref in zip(data, augs, record.images)]
            augs, views = [a for a, _ in planned], [v for _, v in planned]
        notes: list = []
        if record.segments is not None:
            ids, supervised = self._interleaved(record, transform, iter(views))
        else:
            turns = [(transform(u), transform(a)) for u, a in record.turns] if transform else record.turns
            ids, supervised = self.encoder.encode(turns, len(record.images), record.sample_id, views, notes)
        if len(ids) > self.seq_length:
            raise BadSample("over_length", f"sample {record.sample_id}: {len(ids)} tokens exceed seq_length {self.seq_length}")
        images = [(d, aug, ref.source) for d, ref, aug in zip(data, record.images, augs)]
        return Example(record.sample_id, ids, shifted_labels(ids, supervised), images, notes=notes)


def without_images(record: Record) -> Record:
    """The record's text alone: no images, no <image> tags, no image segments."""
    turns = None if record.turns is None else [(u.replace("<image>", "").strip(), a) for u, a in record.turns]
    segments = None if record.segments is None else [s for s in record.segments if s[0] == "text"]
    return dataclasses.replace(record, images=[], turns=turns, segments=segments)


class TextExampleBuilder:
    """Image-caption record -> the Q-Former's text: [bos] caption [eos], cut to ``max_tokens``
    (BLIP-2 stage 1 has no chat template and no LLM)."""

    def __init__(self, tokenizer, max_tokens: int, augment=None, seed: int = 0):
        self.tok, self.max_tokens, self.augment, self.seed = tokenizer, max_tokens, augment, seed

    def build(self, record: Record, index: int, epoch: int) -> Example:
        if record.turns is None or len(record.images) != 1:
            raise BadSample("malformed_record", f"sample {record.sample_id}: Q-Former pre-training needs one image "
                                                f"and its caption")
        augs, transform = augment_record(record, self.augment, self.seed, epoch, index)
        caption = record.turns[0][1]
        caption = transform(caption) if transform else caption
        ids = self.tok.bos_ids + self.tok.encode(caption)[: self.max_tokens - 1 - len(self.tok.bos_ids)] + [self.tok.eos_id]
        images = [(ref.read(record.sample_id), aug, ref.source) for ref, aug in zip(record.images, augs)]
        return Example(record.sample_id, ids, [], images)
