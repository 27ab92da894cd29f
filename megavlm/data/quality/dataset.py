"""The records of a dataset as the filter sees them, and the filtered dataset written back in the
input's own format.

Each record becomes an ``Item``: its images (encoded bytes), the text each image is paired with
for CLIP similarity, and the record's whole text (for duplicate captions):

* captions       the image and its caption
* conversations  every image with the conversation's text (all turns, ``<image>`` tags removed)
* interleaved    every image with the text chunk after it (before it, for a document's last image);
                 the record's score is its worst pair
* shards         as the format the shards were written from
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from megavlm.data.records import ImageRef, Record, ShardSource, parse_record, tar_members
from megavlm.data.shards import image_names, with_image_names
from megavlm.data.templates import BadSample
from megavlm.data.tokenizer import IMAGE_TOKEN


@dataclass
class Item:
    index: int
    sample_id: str
    images: list[bytes] = field(default_factory=list)
    pair_texts: list[str] = field(default_factory=list)   # the text each image is scored against
    text: str = ""                                          # the record's whole text
    error: tuple[str, str] | None = None                    # (reason, message) of an unusable record


class FilterInput:
    """Random access to the raw records of ``path`` (``fmt``), their parsed form and their images."""

    def __init__(self, path: str | Path, fmt: str, root: str | Path | None = None):
        self.path, self.fmt = Path(path), fmt
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} does not exist")
        self.root = Path(root) if root else self.path.parent
        self.shards = ShardSource(self.path) if fmt == "shards" else None
        if self.shards is not None:
            self.raw = None
        elif fmt == "conversations":
            self.raw = json.loads(self.path.read_text())
            if not isinstance(self.raw, list):
                raise ValueError(f"{self.path} must hold a JSON list of samples")
        elif fmt in ("captions", "interleaved"):
            self.raw = [line for line in self.path.read_text().splitlines() if line.strip()]
        else:
            raise ValueError(f"unknown data format {fmt!r} (captions, conversations, interleaved, shards)")

    def __len__(self) -> int:
        return len(self.shards) if self.shards is not None else len(self.raw)

    @property
    def record_format(self) -> str:
        return self.shards.fmt if self.shards is not None else self.fmt

    def where(self, index: int) -> str:
        if self.shards is not None:
            return f"{self.path.name}[{index}]"
        return f"{self.path.name}[{index}]" if self.fmt == "conversations" else f"{self.path.name}:line {index + 1}"

    def raw_record(self, index: int):
        """The record as stored (a dict), or a BadSample for a malformed line."""
        if self.shards is not None:
            shard, key, members = self.shards.samples[index]
            return json.loads(self.shards.member(shard, *members[f"{key}.json"]))
        if self.fmt == "conversations":
            return self.raw[index]
        try:
            return json.loads(self.raw[index])
        except json.JSONDecodeError as err:
            return BadSample("malformed_record", f"sample {self.where(index)}: malformed JSON line ({err.msg})")

    def item(self, index: int) -> Item:
        """The record's images and texts; a record that cannot be used carries its error."""
        where = self.where(index)
        try:
            record = self.shards[index] if self.shards is not None else self._parse(index, where)
            item = Item(index, record.sample_id, text=_record_text(record))
            item.images = [ref.read(record.sample_id) for ref in record.images]
            item.pair_texts = _pair_texts(record)
            return item
        except BadSample as err:
            return Item(index, where, error=(err.reason, str(err)))

    def _parse(self, index: int, where: str) -> Record:
        raw = self.raw_record(index)
        if isinstance(raw, BadSample):
            raise raw
        sample_id = str(raw.get("id", where)) if isinstance(raw, dict) else where
        return parse_record(raw, self.fmt, lambda name: ImageRef(str(self.root / name), path=self.root / name),
                            sample_id)


def _record_text(record: Record) -> str:
    if record.segments is not None:
        return " ".join(value for kind, value in record.segments if kind == "text").strip()
    return " ".join(f"{user.replace(IMAGE_TOKEN, ' ')} {answer}" for user, answer in record.turns).strip()


def _pair_texts(record: Record) -> list[str]:
    """The text each image of the record is scored against."""
    if record.segments is None:
        return [_record_text(record)] * len(record.images)
    texts = []
    for position, (kind, value) in enumerate(record.segments):
        if kind != "image":
            continue
        after = [v for k, v in record.segments[position + 1:] if k == "text"]
        before = [v for k, v in record.segments[:position] if k == "text"]
        texts.append((after[:1] or before[-1:] or [""])[0])
    return texts


# ---- writing the kept records ------------------------------------------------------------------
def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _relocated(raw: dict, fmt: str, root: Path, out_dir: Path) -> dict:
    """The record with relative image paths rewritten to point from ``out_dir`` to the same files."""
    names = [name if os.path.isabs(name) else os.path.relpath(root / name, out_dir) for name in image_names(raw, fmt)]
    return with_image_names(raw, fmt, names)


def write_kept(source: FilterInput, keep: list[int], out_dir: Path) -> Path:
    """The kept records (in input order) as ``out_dir/<input file name>`` in the input's format
    (shards: ``out_dir/shards/index.json`` and its tars). Images are not copied: the paths of a
    JSON format are rewritten relative to ``out_dir``; shards get their members copied."""
    if source.shards is not None:
        return _write_shards(source, keep, out_dir / "shards")
    out = out_dir / source.path.name
    records = [_relocated(source.raw_record(i), source.fmt, source.root, out_dir) for i in keep]
    if source.fmt == "conversations":
        _atomic_write(out, json.dumps(records, indent=1))
    else:
        _atomic_write(out, "".join(json.dumps(r) + "\n" for r in records))
    return out


def _write_shards(source: FilterInput, keep: list[int], out_dir: Path, per_shard: int = 1000) -> Path:
    """New webdataset shards holding the kept samples' members unchanged, and their index."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names, samples = [], []
    for start in range(0, len(keep), per_shard):
        name = f"shard-{len(names):05d}.tar"
        tmp = out_dir / f".{name}.tmp"
        keys = []
        with tarfile.open(tmp, "w") as tar:
            for index in keep[start:start + per_shard]:
                shard, key, members = source.shards.samples[index]
                for member, (offset, size) in sorted(members.items()):
                    info = tarfile.TarInfo(member)
                    info.size = size
                    tar.addfile(info, io.BytesIO(source.shards.member(shard, offset, size)))
                keys.append(key)
        os.replace(tmp, out_dir / name)
        offsets = tar_members(out_dir / name)
        samples += [[len(names), key, {m: list(v) for m, v in offsets.items() if m.startswith(key + ".")}]
                    for key in keys]
        names.append(name)
    index = out_dir / "index.json"
    _atomic_write(index, json.dumps({"format": source.shards.fmt, "shards": names, "samples": samples}))
    return index
