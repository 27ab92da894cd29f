"""Writing webdataset tar shards with a random-access index (read back by records.ShardSource).

Each sample is ``<key>.json`` (the record, image paths replaced by member names) plus
``<key>.<i>.<ext>`` for its images. ``index.json`` lists the shards and, per sample, the byte
offset and size of each member, so training reads any sample directly (deterministic order,
exact resume) while the shards stay plain webdataset tars any other tool can stream.
"""
from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field
from pathlib import Path

from megavlm.data.records import tar_members
from megavlm.data.templates import BadSample


@dataclass
class ShardReport:
    samples: int = 0
    images: int = 0
    bytes: int = 0
    shards: list[str] = field(default_factory=list)
    skipped: collections.Counter = field(default_factory=collections.Counter)
    examples: dict = field(default_factory=dict)   # reason -> first message


def _raw_records(path: Path, fmt: str):
    if fmt == "conversations":
        records = json.loads(path.read_text())
        if not isinstance(records, list):
            raise ValueError(f"{path} must hold a JSON list of samples")
        yield from ((f"{path.name}[{i}]", r) for i, r in enumerate(records))
        return
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{path.name}:{n}", json.loads(line)
        except json.JSONDecodeError as err:
            yield f"{path.name}:{n}", BadSample("malformed_record", f"{path.name}:{n}: malformed JSON line ({err.msg})")


def image_names(record: dict, fmt: str) -> list[str]:
    if fmt == "interleaved":
        return [item["image"] for item in record.get("content", []) if isinstance(item, dict) and "image" in item]
    image = record.get("image")
    return [] if image is None else (image if isinstance(image, list) else [image])


def with_image_names(record: dict, fmt: str, names: list[str]) -> dict:
    """The record with its image paths replaced by shard member names."""
    out = dict(record)
    if fmt == "interleaved":
        it = iter(names)
        out["content"] = [dict(item, image=next(it)) if isinstance(item, dict) and "image" in item else item
                          for item in record["content"]]
    elif isinstance(record.get("image"), list):
        out["image"] = names
    elif "image" in record:
        out["image"] = names[0]
    return out


def write_shards(path: str | Path, fmt: str, out_dir: str | Path, root: str | Path | None = None,
                 samples_per_shard: int = 1000) -> ShardReport:
    import webdataset as wds

    path, out_dir = Path(path), Path(out_dir)
    root = Path(root) if root else path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    report, index_samples, writer = ShardReport(), [], None
    for where, raw in _raw_records(path, fmt):
        try:
            if isinstance(raw, BadSample):
                raise raw
            if not isinstance(raw, dict):
                raise BadSample("malformed_record", f"{where}: a record must be a JSON object")
            files = [root / name for name in image_names(raw, fmt)]
            missing = [f for f in files if not f.is_file() or f.stat().st_size == 0]
            if missing:
                raise BadSample("missing_image", f"{where}: image {missing[0]} is missing or empty")
        except BadSample as err:
            report.skipped[err.reason] += 1
            report.examples.setdefault(err.reason, str(err))
            continue
        if writer is None or report.samples % samples_per_shard == 0:
            if writer is not None:
                writer.close()
            report.shards.append(f"shard-{len(report.shards):05d}.tar")
            writer = wds.TarWriter(str(out_dir / report.shards[-1]))
        key = f"{report.samples:09d}"
        names = [f"{i}{f.suffix.lower() or '.jpg'}" for i, f in enumerate(files)]
        sample = {"__key__": key, "json": json.dumps(with_image_names(raw, fmt, names)).encode()}
        for name, file in zip(names, files):
            sample[name] = file.read_bytes()
            report.bytes += len(sample[name])
        writer.write(sample)
        index_samples.append([len(report.shards) - 1, key])
        report.samples += 1
        report.images += len(files)
    if writer is not None:
        writer.close()
    members = [tar_members(out_dir / s) for s in report.shards]
    samples = [[shard, key, {m: list(v) for m, v in members[shard].items() if m.startswith(key + ".")}]
               for shard, key in index_samples]
    (out_dir / "index.json").write_text(json.dumps({"format": fmt, "shards": report.shards, "samples": samples}))
    return report
