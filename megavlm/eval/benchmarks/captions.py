"""Image captioning (COCO Karpathy test, Flickr30K, NoCaps): CIDEr-D and BLEU-4 from
pycocoevalcap's scorers over captions tokenised in Python the way its PTB tokenizer does
(lower case, punctuation removed), so no Java is needed.

Files under ``path``: a Karpathy split file (``dataset_*.json``: {"images": [{filename,
filepath?, split, sentences: [{raw}]}]}, the ``test`` split is used) or COCO-format captions
(``*captions*.json``: {"images": [{id, file_name}], "annotations": [{image_id, caption}]}, as
NoCaps ships them). Images under ``path/images`` (``filepath/filename`` for Karpathy files).
"""
from __future__ import annotations

import re
from pathlib import Path

from megavlm.eval.benchmarks.base import Benchmark, BenchmarkError, Sample, field_of, find_file, read_json

PROMPT = "Provide a one-sentence caption for the provided image."
# pycocoevalcap's PTBTokenizer drops these tokens after tokenising
_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


def tokenize(text: str) -> str:
    """Lower-cased words joined by spaces, punctuation dropped (what the scorers expect)."""
    return " ".join(t for t in _TOKEN.findall(text.lower()) if t not in _PUNCTUATION)


def caption_scores(references: dict[str, list[str]], candidates: dict[str, str]) -> dict[str, float]:
    """CIDEr-D and BLEU-1..4 of one candidate per key against its references (raw text)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    gts = {k: [tokenize(r) for r in refs] for k, refs in references.items()}
    res = {k: [tokenize(candidates[k])] for k in references}
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"cider": float(cider), "bleu4": float(bleu[3]), "bleu1": float(bleu[0])}


class Captions(Benchmark):
    max_new_tokens = 24

    def __init__(self, name: str):
        self.name = name

    def load(self, path: Path) -> list[Sample]:
        karpathy = sorted(path.glob("dataset_*.json")) if path.is_dir() else []
        if karpathy:
            return self._karpathy(path, karpathy[0])
        return self._coco(path, find_file(path, ("*captions*.json",), self.name))

    def _karpathy(self, path: Path, file: Path) -> list[Sample]:
        images = field_of(read_json(file, self.name), "images", str(file), list)
        samples = []
        for i, image in enumerate(images):
            where = f"{self.name}: {file} image {i}"
            if field_of(image, "split", where, str) != "test":
                continue
            refs = [field_of(s, "raw", where, str) for s in field_of(image, "sentences", where, list)]
            if not refs:
                raise BenchmarkError(f"{where}: no reference sentences")
            name = field_of(image, "filename", where, str)
            rel = Path(image.get("filepath", "")) / name
            samples.append(Sample(str(image.get("cocoid", image.get("imgid", name))), str(path / "images" / rel),
                                  PROMPT, refs))
        return samples

    def _coco(self, path: Path, file: Path) -> list[Sample]:
        data = read_json(file, self.name)
        refs: dict = {}
        for i, ann in enumerate(field_of(data, "annotations", str(file), list)):
            where = f"{self.name}: {file} annotation {i}"
            refs.setdefault(field_of(ann, "image_id", where), []).append(field_of(ann, "caption", where, str))
        samples = []
        for i, image in enumerate(field_of(data, "images", str(file), list)):
            where = f"{self.name}: {file} image {i}"
            image_id = field_of(image, "id", where)
            if image_id not in refs:
                raise BenchmarkError(f"{where}: image id {image_id} has no caption annotation")
            samples.append(Sample(str(image_id), str(path / "images" / field_of(image, "file_name", where, str)),
                                  PROMPT, refs[image_id]))
        return samples

    def score(self, samples, predictions) -> dict[str, float]:
        return caption_scores({s.sample_id: s.reference for s in samples},
                              {s.sample_id: p for s, p in zip(samples, predictions)})
