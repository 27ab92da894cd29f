"""POPE (object hallucination): yes/no questions about objects present or absent, in its
random / popular / adversarial splits; accuracy, precision, recall, F1 (of "yes") and the share
of "yes" answers per split, and their mean.

Files under ``path``: ``*_pope_{random,popular,adversarial}.json`` (JSON lines: {question_id,
image, text, label: yes|no}), images under ``path/images``.
"""
from __future__ import annotations

from pathlib import Path

from megavlm.eval.benchmarks.base import Benchmark, BenchmarkError, Sample, field_of, read_json_lines

SPLITS = ("random", "popular", "adversarial")
PROMPT = "\nAnswer the question using a single word or phrase."


def yes_no(text: str) -> str:
    """LLaVA's POPE rule: the first sentence; "no" if it says no / not, else "yes"."""
    first = text.split(".")[0].replace(",", " ")
    words = [w.lower() for w in first.split()]
    return "no" if any(w in ("no", "not") for w in words) else "yes"


def binary_metrics(predictions: list[str], labels: list[str]) -> dict[str, float]:
    tp = sum(p == "yes" and l == "yes" for p, l in zip(predictions, labels))
    fp = sum(p == "yes" and l == "no" for p, l in zip(predictions, labels))
    tn = sum(p == "no" and l == "no" for p, l in zip(predictions, labels))
    fn = sum(p == "no" and l == "yes" for p, l in zip(predictions, labels))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / len(labels), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / len(labels)}


class POPE(Benchmark):
    name = "pope"
    max_new_tokens = 16     # the rule reads the first sentence: "Yes, there is ..." / "red circle: no"

    def load(self, path: Path) -> list[Sample]:
        if not path.is_dir():
            raise BenchmarkError(f"pope: {path} is not a directory")
        samples = []
        for split in SPLITS:
            files = sorted(path.glob(f"*pope_{split}.json*"))
            if not files:
                raise BenchmarkError(f"pope: no *pope_{split}.json in {path}")
            for i, record in enumerate(read_json_lines(files[0], "pope")):
                where = f"pope: {files[0]} record {i}"
                label = field_of(record, "label", where, str).strip().lower()
                if label not in ("yes", "no"):
                    raise BenchmarkError(f"{where}: label must be yes or no, got {label!r}")
                samples.append(Sample(f"{split}/{field_of(record, 'question_id', where)}",
                                      str(path / "images" / field_of(record, "image", where, str)),
                                      field_of(record, "text", where, str) + PROMPT, label, {"split": split}))
        return samples

    def extract(self, text, sample):
        return yes_no(text)

    def score(self, samples, predictions) -> dict[str, float]:
        out, per_split = {}, []
        for split in SPLITS:
            rows = [(p, s.reference) for s, p in zip(samples, predictions) if s.meta["split"] == split]
            if rows:
                metrics = binary_metrics(*map(list, zip(*rows)))
                per_split.append(metrics)
                out.update({f"{split}_{k}": v for k, v in metrics.items()})
        for key in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
            out[key] = sum(m[key] for m in per_split) / len(per_split)
        return out
