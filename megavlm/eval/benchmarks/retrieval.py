"""Image-text retrieval (Flickr30K / COCO Karpathy test) for ITC models (BLIP-2 stage 1): R@1/5/10
image->text and text->image, where a retrieved item is right when it shares the query's image
(a text's own image; any of an image's captions). Scored by eval/retrieval.py.

Files under ``path``: a Karpathy split file (``dataset_*.json``), images under ``path/images``.
"""
from __future__ import annotations

from pathlib import Path

from megavlm.eval.benchmarks.base import Benchmark, Sample
from megavlm.eval.benchmarks.captions import Captions


class Retrieval(Benchmark):
    kind = "retrieval"

    def __init__(self, name: str):
        self.name = name

    def load(self, path: Path) -> list[Sample]:
        """One sample per (image, caption) pair; ``meta["group"]`` is the image."""
        images = Captions(self.name).load(path)
        return [Sample(f"{s.sample_id}/{k}", s.image, caption, s.sample_id, {"group": s.sample_id, "question": s.sample_id})
                for s in images for k, caption in enumerate(s.reference)]
