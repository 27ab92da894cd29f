"""Duplicates among the records that passed the quality filters, decided greedily in input order:
a record is dropped when it duplicates an earlier *kept* record, so the first of every group
stays, whatever the order of the checks below.

* exact: the same decoded pixels (every image, in order) and the same normalised text;
* near-duplicate image: any of a record's images is close to a kept image by one of the
  detectors: colour pHash within a Hamming radius, colour-thumbnail cosine, CLIP-embedding
  cosine. Similarities are matrix products over blocks of images (on the GPU when there is one),
  so memory stays bounded and the cost is one pass over the kept images per block;
* near-duplicate caption: captions whose character 5-gram Jaccard similarity (MinHash LSH,
  datasketch) reaches a threshold form a group; past ``max_repeats`` kept records a group's
  further records are dropped (boilerplate such as "click to enlarge" on thousands of images).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Drop:
    index: int
    reason: str
    score: float | None = None
    detail: dict = field(default_factory=dict)


def exact_duplicates(order: list[int], pixel_hashes: dict[int, tuple], text_hashes: dict[int, str],
                     sample_ids: dict[int, str]) -> dict[int, Drop]:
    first: dict = {}
    drops = {}
    for index in order:
        key = (pixel_hashes.get(index, ()), text_hashes[index])
        if key in first:
            drops[index] = Drop(index, "exact_duplicate", None, {"duplicate_of": sample_ids[first[key]]})
        else:
            first[key] = index
    return drops


class Detector:
    """Near-duplicate test on image features [n, d] (float32): ``score`` of query rows against
    kept rows, and whether a score is a match."""

    name = ""

    def __init__(self, features: torch.Tensor, limit: float):
        self.features, self.limit = features, limit

    def score(self, rows: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        return self.features[rows] @ self.features[kept].t()

    def matches(self, score: torch.Tensor) -> torch.Tensor:
        return score >= self.limit

    def best(self, score: torch.Tensor, hit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The closest matching kept row of each query row (score, position)."""
        return score.masked_fill(~hit, float("-inf")).max(1)


class HammingDetector(Detector):
    """Packed hash bits [n, bytes] -> their bits as 0/1 floats: the Hamming distance of a and b is
    |a| + |b| - 2 a.b, one matrix product."""

    name = "phash"

    def __init__(self, packed: np.ndarray, radius: float, device):
        bits = torch.from_numpy(np.unpackbits(packed, axis=1).astype(np.float32)).to(device)
        super().__init__(bits, radius)
        self.ones = bits.sum(1)

    def score(self, rows, kept):
        return self.ones[rows, None] + self.ones[None, kept] - 2 * super().score(rows, kept)

    def matches(self, score):
        return score <= self.limit

    def best(self, score, hit):
        return score.masked_fill(~hit, float("inf")).min(1)


class CosineDetector(Detector):
    def __init__(self, name: str, features: np.ndarray, threshold: float, device):
        normed = torch.nn.functional.normalize(torch.from_numpy(np.asarray(features, np.float32)), dim=-1)
        super().__init__(normed.to(device), threshold)
        self.name = name


def _first_match(detectors: list[Detector], rows: torch.Tensor, kept: torch.Tensor, block: int):
    """For each query row, the first detector that matches some kept row: (kept position, detector
    index, score), -1 where none does."""
    n = rows.shape[0]
    where = torch.full((n,), -1, dtype=torch.long)
    method = torch.full((n,), -1, dtype=torch.long)
    value = torch.zeros(n)
    for d, detector in enumerate(detectors):
        for start in range(0, kept.shape[0], block):
            todo = (where < 0).nonzero().squeeze(1)
            if not todo.numel():
                return where, method, value
            score = detector.score(rows[todo], kept[start:start + block])
            hit = detector.matches(score)
            best_score, best = detector.best(score, hit)
            found = hit.any(1).cpu()
            where[todo[found]] = start + best.cpu()[found]
            method[todo[found]] = d
            value[todo[found]] = best_score.float().cpu()[found]
    return where, method, value


def near_duplicate_images(order: list[int], image_record: list[int], detectors: list[Detector],
                          sample_ids: dict[int, str], chunk: int = 256, block: int = 8192) -> dict[int, Drop]:
    """Records (in ``order``) with an image close to an image of an earlier kept record."""
    if not detectors:
        return {}
    images_of: dict[int, list[int]] = defaultdict(list)
    for row, record in enumerate(image_record):
        images_of[record].append(row)
    kept: list[int] = []
    drops = {}
    for start in range(0, len(order), chunk):
        records = [r for r in order[start:start + chunk] if images_of.get(r)]
        rows = torch.tensor([row for r in records for row in images_of[r]], dtype=torch.long)
        if not rows.numel():
            continue
        position = {row: i for i, row in enumerate(rows.tolist())}
        old = _first_match(detectors, rows, torch.tensor(kept, dtype=torch.long), block)
        kept_here: list[int] = []
        for record in records:
            hit = _hit(images_of[record], position, old, kept, detectors)
            if hit is None and kept_here:
                new = _first_match(detectors, torch.tensor(images_of[record]), torch.tensor(kept_here), block)
                hit = _hit(images_of[record], {row: i for i, row in enumerate(images_of[record])}, new, kept_here,
                           detectors)
            if hit is None:
                kept_here += images_of[record]
                continue
            kept_row, name, score = hit
            drops[record] = Drop(record, "near_duplicate_image", score,
                                 {"duplicate_of": sample_ids[image_record[kept_row]], "method": name})
        kept += kept_here
    return drops


def _hit(rows: list[int], position: dict, match, kept: list[int], detectors: list[Detector]):
    where, method, value = match
    for row in rows:
        i = position[row]
        if where[i] >= 0:
            return kept[int(where[i])], detectors[int(method[i])].name, round(float(value[i]), 4)
    return None


def _minhash(text: str, num_perm: int):
    from datasketch import MinHash

    shingles = {text[i:i + 5] for i in range(max(1, len(text) - 4))}
    m = MinHash(num_perm=num_perm)
    m.update_batch([s.encode() for s in shingles])
    return m


def near_duplicate_captions(order: list[int], texts: dict[int, str], sample_ids: dict[int, str], threshold: float,
                            max_repeats: int | None, num_perm: int = 128) -> tuple[dict[int, Drop], list[dict]]:
    """(drops, the largest caption groups) for records in ``order``: a group holds captions whose
    estimated Jaccard similarity to its first caption reaches ``threshold``; records past
    ``max_repeats`` kept ones in a group are dropped (None: groups are reported, nothing is dropped)."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    group_of, size, first, hashes = {}, defaultdict(int), {}, {}
    drops = {}
    for index in order:
        text = texts[index]
        if not text:
            continue
        m = _minhash(text, num_perm)
        near = [int(k) for k in lsh.query(m)]
        group = group_of[min(near)] if near else index
        first.setdefault(group, index)
        if max_repeats is not None and size[group] >= max_repeats:
            drops[index] = Drop(index, "near_duplicate_caption", round(m.jaccard(hashes[first[group]]), 4),
                                {"duplicate_of": sample_ids[first[group]], "group_size": size[group]})
            continue
        size[group] += 1
        group_of[index], hashes[index] = group, m
        lsh.insert(str(index), m)
    largest = sorted(size.items(), key=lambda kv: -kv[1])[:10]
    return drops, [{"caption": texts[first[g]], "records": n} for g, n in largest if n > 1]
