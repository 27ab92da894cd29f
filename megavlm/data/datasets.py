"""Datasets of image-text samples -> token ids, labels and preprocessed images.

``CaptionDataset`` reads JSONL ``{"image", "caption"}``; ``ConversationDataset`` reads LLaVA JSON
(``conversations`` of human/gpt turns, ``image`` a path, a list of paths, or absent for text-only).
A sample that cannot be used raises ``BadSample`` with a reason; the loader skips and counts it.
"""
from __future__ import annotations

import abc
import json
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from megavlm.data.image_transforms import clip_preprocess
from megavlm.data.templates import BadSample, ConversationEncoder, normalize_turns, shifted_labels

MIN_IMAGE_SIDE = 2
MAX_ASPECT = 20.0


def load_image(path: Path, size: int, sample_id: str) -> torch.Tensor:
    try:
        if not path.is_file():
            raise BadSample("missing_image", f"sample {sample_id}: image {path} does not exist")
        if path.stat().st_size == 0:
            raise BadSample("corrupt_image", f"sample {sample_id}: image {path} is an empty file")
        with Image.open(path) as image:
            image.load()
            w, h = image.size
            if min(w, h) < MIN_IMAGE_SIDE or max(w, h) / min(w, h) > MAX_ASPECT:
                raise BadSample("bad_image_shape", f"sample {sample_id}: image {path} is {w}x{h}")
            return clip_preprocess(image, size)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        if isinstance(err, BadSample):
            raise
        raise BadSample("corrupt_image", f"sample {sample_id}: cannot decode image {path}: {err}") from None


class _ImageTextDataset(torch.utils.data.Dataset, abc.ABC):
    def __init__(self, records: list, root: Path, encoder: ConversationEncoder, image_size: int, seq_length: int,
                 source: str):
        self.records, self.root, self.encoder = records, root, encoder
        self.image_size, self.seq_length, self.source = image_size, seq_length, source

    def __len__(self) -> int:
        return len(self.records)

    def _image_paths(self, record: dict, sample_id: str) -> list[Path]:
        image = record.get("image")
        if image is None:
            return []
        images = image if isinstance(image, list) else [image]
        if not all(isinstance(p, str) for p in images):
            raise BadSample("malformed_record", f"sample {sample_id}: 'image' must be a path or a list of paths")
        return [self.root / p for p in images]

    @abc.abstractmethod
    def _pairs(self, record: dict, sample_id: str) -> list[tuple[str, str]]:
        """The (user, assistant) turns of a record, in the subclass's format."""

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        if not isinstance(record, dict):
            raise BadSample("malformed_record", f"{self.source} record {index} is not an object: {str(record)[:80]!r}")
        sample_id = str(record.get("id", f"{self.source}#{index}"))
        paths = self._image_paths(record, sample_id)
        pairs = self._pairs(record, sample_id)
        ids, supervised = self.encoder.encode(pairs, len(paths), sample_id)
        if len(ids) > self.seq_length:
            raise BadSample("over_length", f"sample {sample_id}: {len(ids)} tokens exceed seq_length {self.seq_length}")
        images = [load_image(p, self.image_size, sample_id) for p in paths]
        return {"id": sample_id, "input_ids": ids, "labels": shifted_labels(ids, supervised),
                "images": torch.stack(images) if images else torch.zeros(0, 3, self.image_size, self.image_size)}


class CaptionDataset(_ImageTextDataset):
    """JSONL of {"image": path, "caption": text}; malformed lines become BadSample at access."""

    def __init__(self, path: str | Path, encoder: ConversationEncoder, image_size: int, seq_length: int,
                 root: str | Path | None = None):
        path = Path(path)
        records = []
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                records.append(f"line {line_no}: {line[:60]}")
        super().__init__(records, Path(root) if root else path.parent, encoder, image_size, seq_length, path.name)

    def _pairs(self, record: dict, sample_id: str) -> list[tuple[str, str]]:
        caption = record.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise BadSample("malformed_record", f"sample {sample_id}: 'caption' must be a non-empty string")
        if not isinstance(record.get("image"), str):
            raise BadSample("malformed_record", f"sample {sample_id}: 'image' must be a path")
        return [("<image>", caption)]


class ConversationDataset(_ImageTextDataset):
    """LLaVA-style JSON list of {"image"?: path | [paths], "conversations": [{from, value}, ...]}."""

    def __init__(self, path: str | Path, encoder: ConversationEncoder, image_size: int, seq_length: int,
                 root: str | Path | None = None):
        path = Path(path)
        try:
            records = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(records, list):
            raise ValueError(f"{path} must hold a JSON list of samples")
        super().__init__(records, Path(root) if root else path.parent, encoder, image_size, seq_length, path.name)

    def _pairs(self, record: dict, sample_id: str) -> list[tuple[str, str]]:
        return normalize_turns(record.get("conversations"), sample_id)
