"""What every benchmark is made of: samples loaded from its published files, a prompt, answer
extraction and a metric. The runner (eval/benchmark_runner.py) generates the answers."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class BenchmarkError(ValueError):
    """A benchmark that cannot run: a missing file, a malformed record, an unknown name."""


@dataclass
class Sample:
    sample_id: str                    # unique within the benchmark (question id, + rotation)
    image: str | bytes | None         # an image file, or its encoded bytes (MMBench's base64)
    question: str                     # the user turn, without the image tag
    reference: Any                    # what ``score`` compares an answer with
    meta: dict = field(default_factory=dict)


class Benchmark:
    """Subclasses set ``name``, ``max_new_tokens`` and implement ``load``, ``extract``, ``score``."""

    name = ""
    max_new_tokens = 16
    kind = "generate"                 # or "retrieval" (scored by an ITC model's similarities)

    def load(self, path: Path) -> list[Sample]:
        raise NotImplementedError

    def extract(self, text: str, sample: Sample) -> Any:
        """The prediction in the answer text (what ``score`` compares)."""
        return text.strip()

    def score(self, samples: list[Sample], predictions: list[Any]) -> dict[str, float]:
        raise NotImplementedError


def read_json(path: Path, what: str):
    if not path.is_file():
        raise BenchmarkError(f"{what}: {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BenchmarkError(f"{what}: {path} is not valid JSON ({err})") from None


def read_json_lines(path: Path, what: str) -> list[dict]:
    """JSON lines, or one JSON array (both layouts are in circulation)."""
    if not path.is_file():
        raise BenchmarkError(f"{what}: {path} does not exist")
    text = path.read_text().strip()
    if text.startswith("["):
        return read_json(path, what)
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise BenchmarkError(f"{what}: {path} line {number} is not valid JSON ({err})") from None
    return records


def field_of(record: dict, key: str, where: str, kind=None):
    """record[key], or an error naming the record and the key."""
    if not isinstance(record, dict) or key not in record:
        raise BenchmarkError(f"{where}: missing key {key!r}")
    value = record[key]
    if kind is not None and not isinstance(value, kind):
        raise BenchmarkError(f"{where}: {key!r} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def find_file(root: Path, patterns: tuple[str, ...], what: str) -> Path:
    """The one file under ``root`` matching the first pattern that matches anything."""
    if not root.is_dir():
        raise BenchmarkError(f"{what}: {root} is not a directory")
    for pattern in patterns:
        found = sorted(root.glob(pattern))
        if len(found) > 1:
            raise BenchmarkError(f"{what}: several files match {pattern!r} in {root}: {[p.name for p in found]}")
        if found:
            return found[0]
    raise BenchmarkError(f"{what}: no file matching {' or '.join(patterns)} in {root}")
