"""Referring expression comprehension (RefCOCO / RefCOCO+ / RefCOCOg): the model answers with a
box [x1, y1, x2, y2], as fractions of the image size (LLaVA-1.5's convention) or in pixels;
Acc@0.5 is the share of boxes whose IoU with the true box is at least 0.5.

Files under ``path``: ``refs(<split_by>).p`` (the published pickle: [{ref_id, ann_id, image_id,
file_name, split, sentences: [{sent}]}]) and ``instances.json`` (COCO: annotations with
``bbox`` [x, y, w, h], images with width/height); the ``split`` of the spec ("val" by default)
is used, one sample per sentence. Images in ``path/images`` by ``file_name`` (the COCO
``..._<image id>.jpg`` name is tried when the ref's own name is not there).
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

from megavlm.eval.benchmarks.base import Benchmark, BenchmarkError, Sample, field_of, find_file, read_json

PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: {}"
_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
_BOX = re.compile(r"\[" + ",".join([_NUMBER] * 4) + r"\]")


class _PlainUnpickler(pickle.Unpickler):
    """The refs file holds only lists, dicts, strings and numbers: refuse anything else."""

    def find_class(self, module, name):
        raise BenchmarkError(f"refcoco: the refs pickle asks for {module}.{name}; only plain data is accepted")


def parse_box(text: str, width: float, height: float) -> list[float] | None:
    """The first [x1, y1, x2, y2] in the text, in pixels; values all <= 1 are fractions."""
    match = _BOX.search(text)
    if not match:
        return None
    box = [float(v) for v in match.groups()]
    if max(box) <= 1.0:
        box = [box[0] * width, box[1] * height, box[2] * width, box[3] * height]
    return box


def iou(a: list[float], b: list[float]) -> float:
    """Intersection over union of two [x1, y1, x2, y2] boxes (an inverted box has no area)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = lambda r: max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])  # noqa: E731
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


class RefCOCO(Benchmark):
    max_new_tokens = 28

    def __init__(self, name: str, split: str = "val"):
        self.name, self.split = name, split

    def load(self, path: Path) -> list[Sample]:
        refs_file = find_file(path, ("refs(*).p", "refs*.p"), self.name)
        try:
            with open(refs_file, "rb") as f:
                refs = _PlainUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError) as err:
            raise BenchmarkError(f"{self.name}: {refs_file} is not a refs pickle ({err})") from None
        instances = read_json(find_file(path, ("instances.json",), self.name), self.name)
        boxes = {a["id"]: a["bbox"] for a in field_of(instances, "annotations", "instances.json", list)}
        sizes = {i["id"]: (i["width"], i["height"], i.get("file_name")) for i in field_of(instances, "images",
                                                                                       "instances.json", list)}
        samples = []
        for n, ref in enumerate(refs):
            where = f"{self.name}: {refs_file} ref {n}"
            if field_of(ref, "split", where, str) != self.split:
                continue
            ann, image_id = field_of(ref, "ann_id", where), field_of(ref, "image_id", where)
            if ann not in boxes or image_id not in sizes:
                raise BenchmarkError(f"{where}: annotation {ann} / image {image_id} is not in instances.json")
            x, y, w, h = boxes[ann]
            width, height, coco_name = sizes[image_id]
            image = path / "images" / field_of(ref, "file_name", where, str)
            if not image.is_file() and coco_name:
                image = path / "images" / coco_name
            for k, sent in enumerate(field_of(ref, "sentences", where, list)):
                samples.append(Sample(f"{ref.get('ref_id', n)}/{k}", str(image),
                                      PROMPT.format(field_of(sent, "sent", where, str)),
                                      [x, y, x + w, y + h], {"width": width, "height": height}))
        return samples

    def extract(self, text, sample):
        return parse_box(text, sample.meta["width"], sample.meta["height"])

    def score(self, samples, predictions) -> dict[str, float]:
        ious = [iou(p, s.reference) if p is not None else 0.0 for s, p in zip(samples, predictions)]
        return {"acc@0.5": sum(v >= 0.5 for v in ious) / len(ious), "mean_iou": sum(ious) / len(ious),
                "unparsed": float(sum(p is None for p in predictions))}
