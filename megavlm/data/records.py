"""Sources of records: the on-disk formats, read lazily so one bad record fails alone.

* ``captions``      JSONL ``{"image": path, "caption": text}``                      (stages 1-2)
* ``conversations`` JSON list ``{"image"?: path | [paths], "conversations": [{"from", "value"}]}``
                    (LLaVA; ``<image>`` anywhere in a turn, several images, or none)
* ``interleaved``   JSONL ``{"content": [{"text": ...} | {"image": path}, ...]}`` in reading order
                    (Flamingo-style documents)
* ``shards``        webdataset tar shards written by ``tools/prepare_dataset.py``, with an index
                    that gives random access (and therefore exact resume)

Each source is indexable and returns a ``Record``; anything malformed raises ``BadSample``
naming the file and the record.
"""
from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from megavlm.data.templates import BadSample, normalize_turns

FORMATS = ("captions", "conversations", "interleaved", "shards")


@dataclass
class ImageRef:
    """An image by path, or its encoded bytes (from a shard)."""

    source: str                  # path or "shard:member" (for messages)
    path: Path | None = None
    data: bytes | None = None

    def read(self, sample_id: str) -> bytes:
        if self.data is not None:
            return self.data
        if not self.path.is_file():
            raise BadSample("missing_image", f"sample {sample_id}: image {self.path} does not exist")
        data = self.path.read_bytes()
        if not data:
            raise BadSample("corrupt_image", f"sample {sample_id}: image {self.path} is an empty file")
        return data


@dataclass
class Record:
    sample_id: str
    images: list[ImageRef]
    turns: list[tuple[str, str]] | None = None           # chat: (user, assistant) pairs
    segments: list[tuple[str, object]] | None = None      # interleaved: ("text", str) | ("image", index)
    difficulty: float | None = None
    meta: dict = field(default_factory=dict)


def _image_list(value, sample_id: str) -> list[str]:
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(p, str) and p for p in items):
        raise BadSample("malformed_record", f"sample {sample_id}: 'image' must be a path or a list of paths")
    return items


def _difficulty(record: dict, key: str | None, sample_id: str) -> float | None:
    if key is None:
        return None
    value = record.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise BadSample("malformed_record", f"sample {sample_id}: curriculum key '{key}' must be a number, got {value!r}")
    return float(value)


def parse_record(raw: dict, fmt: str, resolve, sample_id: str, difficulty_key: str | None = None) -> Record:
    """One record of ``fmt``; ``resolve(name)`` turns an image name into an ImageRef."""
    if not isinstance(raw, dict):
        raise BadSample("malformed_record", f"sample {sample_id}: a record must be a JSON object, got {str(raw)[:60]!r}")
    difficulty = _difficulty(raw, difficulty_key, sample_id)
    if fmt == "captions":
        caption = raw.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise BadSample("malformed_record", f"sample {sample_id}: 'caption' must be a non-empty string")
        if not isinstance(raw.get("image"), str):
            raise BadSample("malformed_record", f"sample {sample_id}: 'image' must be a path")
        return Record(sample_id, [resolve(raw["image"])], turns=[("<image>", caption)], difficulty=difficulty)
    if fmt == "conversations":
        turns = normalize_turns(raw.get("conversations"), sample_id)
        images = [resolve(p) for p in _image_list(raw.get("image"), sample_id)]
        return Record(sample_id, images, turns=turns, difficulty=difficulty)
    if fmt == "interleaved":
        content = raw.get("content")
        if not isinstance(content, list) or not content:
            raise BadSample("malformed_record", f"sample {sample_id}: 'content' must be a non-empty list")
        images, segments = [], []
        for i, item in enumerate(content):
            if isinstance(item, dict) and isinstance(item.get("text"), str) and "image" not in item:
                segments.append(("text", item["text"]))
            elif isinstance(item, dict) and isinstance(item.get("image"), str) and "text" not in item:
                segments.append(("image", len(images)))
                images.append(resolve(item["image"]))
            else:
                raise BadSample("malformed_record",
                                f"sample {sample_id}: content item {i} must be {{'text': str}} or {{'image': path}}")
        return Record(sample_id, images, segments=segments, difficulty=difficulty)
    raise ValueError(f"unknown record format {fmt!r}; known: {', '.join(FORMATS)}")


class JsonSource:
    """captions / interleaved (JSONL) or conversations (JSON list) from one file."""

    def __init__(self, path: str | Path, fmt: str, root: str | Path | None = None, difficulty_key: str | None = None):
        self.path, self.fmt = Path(path), fmt
        self.root = Path(root) if root else self.path.parent
        self.difficulty_key = difficulty_key
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} does not exist")
        if fmt == "conversations":
            try:
                self.raw = json.loads(self.path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{self.path} is not valid JSON: {err}") from None
            if not isinstance(self.raw, list):
                raise ValueError(f"{self.path} must hold a JSON list of samples")
            self.lines = None
        else:
            self.raw = None
            self.lines = [(n, line) for n, line in enumerate(self.path.read_text().splitlines(), 1) if line.strip()]

    def __len__(self) -> int:
        return len(self.raw) if self.raw is not None else len(self.lines)

    def _resolve(self, name: str) -> ImageRef:
        path = self.root / name
        return ImageRef(str(path), path=path)

    def __getitem__(self, index: int) -> Record:
        if self.raw is not None:
            raw = self.raw[index]
            where = f"{self.path.name}[{index}]"
        else:
            line_no, line = self.lines[index]
            where = f"{self.path.name}:{line_no}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as err:
                raise BadSample("malformed_record", f"sample {where}: malformed JSON line ({err.msg}): {line[:60]!r}") from None
        sample_id = str(raw.get("id", where)) if isinstance(raw, dict) else where
        return parse_record(raw, self.fmt, self._resolve, sample_id, self.difficulty_key)

    def difficulty(self, index: int) -> float:
        """The curriculum key of a record without decoding its images (for ordering)."""
        return self[index].difficulty


class ShardSource:
    """Random access into webdataset tar shards through their index (tools/prepare_dataset.py)."""

    def __init__(self, index_path: str | Path, difficulty_key: str | None = None):
        self.index_path = Path(index_path)
        index = json.loads(self.index_path.read_text())
        self.fmt = index["format"]
        self.samples = index["samples"]          # [shard, key, {member: [offset, size]}]
        self.shards = [self.index_path.parent / s for s in index["shards"]]
        self.difficulty_key = difficulty_key

    def __len__(self) -> int:
        return len(self.samples)

    def member(self, shard: int, offset: int, size: int) -> bytes:
        """The bytes of one tar member."""
        with open(self.shards[shard], "rb") as f:
            f.seek(offset)
            return f.read(size)

    def __getitem__(self, index: int) -> Record:
        shard, key, members = self.samples[index]
        raw = json.loads(self.member(shard, *members[f"{key}.json"]))

        def resolve(name: str) -> ImageRef:
            member = f"{key}.{name}"
            if member not in members:
                raise BadSample("missing_image", f"sample {key}: image {name} is not in shard {self.shards[shard].name}")
            return ImageRef(f"{self.shards[shard].name}:{member}", data=self.member(shard, *members[member]))

        return parse_record(raw, self.fmt, resolve, str(raw.get("id", key)), self.difficulty_key)

    def difficulty(self, index: int) -> float:
        return self[index].difficulty


def open_source(path: str | Path, fmt: str, root: str | Path | None = None, difficulty_key: str | None = None):
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; known: {', '.join(FORMATS)}")
    if fmt == "shards":
        return ShardSource(path, difficulty_key)
    return JsonSource(path, fmt, root, difficulty_key)


def tar_members(path: Path) -> dict[str, tuple[int, int]]:
    """member name -> (data offset, size) of a tar file."""
    with tarfile.open(path) as tar:
        return {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}
