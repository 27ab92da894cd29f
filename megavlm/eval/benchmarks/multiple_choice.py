"""Multiple-choice benchmarks: MMBench (TSV, circular evaluation), SEED-Bench (JSON, image
questions), ScienceQA-IMG (problems.json, test questions with an image).

Options are lettered A, B, C, ...; the answer is read as a letter ("B", "(B)", "B. dog") or,
failing that, as the text of exactly one option. MMBench's circular evaluation asks each
question once per rotation of its options and counts it only if every rotation is right.

Files under ``path``: MMBench: ``*.tsv`` (index, question, hint, A..D, answer, category,
image as base64); SEED-Bench: ``SEED-Bench*.json`` ({"questions": [{question_id, question,
choice_a..choice_d, answer, data_id, data_type}]}), images in ``path/images``; ScienceQA:
``problems.json`` ({pid: {question, choices, answer (index), hint, image, split}}), images in
``path/images/<split>/<pid>/<image>``.
"""
from __future__ import annotations

import base64
import binascii
import csv
import re
from pathlib import Path

from megavlm.eval.benchmarks.base import Benchmark, BenchmarkError, Sample, field_of, find_file, read_json

LETTERS = "ABCDEFGH"
INSTRUCTION = "Answer with the option's letter from the given choices directly."
_LETTER = re.compile(r"^\s*\(?([A-H])\)?(?:[\s.:,)]|$)")


def format_question(question: str, options: list[str], hint: str = "") -> str:
    lines = ([f"Hint: {hint}"] if hint else []) + [question]
    lines += [f"{LETTERS[i]}. {option}" for i, option in enumerate(options)]
    return "\n".join(lines + [INSTRUCTION])


def extract_choice(text: str, options: list[str]) -> str | None:
    """The chosen letter: a leading option letter, else the one option whose text the answer is
    (or contains, when only one option's text occurs)."""
    match = _LETTER.match(text)
    if match and LETTERS.index(match.group(1)) < len(options):
        return match.group(1)
    answer = " ".join(text.lower().strip().rstrip(".").split())
    exact = [i for i, o in enumerate(options) if " ".join(o.lower().split()) == answer]
    if len(exact) == 1:
        return LETTERS[exact[0]]
    contained = [i for i, o in enumerate(options) if o.strip() and re.search(rf"\b{re.escape(o.lower().strip())}\b", answer)]
    return LETTERS[contained[0]] if len(contained) == 1 else None


def rotations(options: list[str], answer: int) -> list[tuple[list[str], int]]:
    """Every circular shift of the options with the answer's new index (shift 0 first)."""
    n = len(options)
    return [(options[k:] + options[:k], (answer - k) % n) for k in range(n)]


def circular_accuracy(samples: list[Sample], predictions: list) -> dict[str, float]:
    """A question counts when all its rotations are right; ``vanilla``: its first rotation only."""
    by_question: dict[str, list[bool]] = {}
    first: dict[str, bool] = {}
    for s, p in zip(samples, predictions):
        right = p == s.reference
        by_question.setdefault(s.meta["question"], []).append(right)
        if s.meta.get("rotation", 0) == 0:
            first[s.meta["question"]] = right
    return {"circular_accuracy": sum(all(v) for v in by_question.values()) / len(by_question),
            "vanilla_accuracy": sum(first.values()) / max(len(first), 1)}


class MultipleChoice(Benchmark):
    max_new_tokens = 6

    def extract(self, text, sample):
        return extract_choice(text, sample.meta["options"])

    def score(self, samples, predictions) -> dict[str, float]:
        return {"accuracy": sum(p == s.reference for s, p in zip(samples, predictions)) / len(samples)}

    @staticmethod
    def sample(sample_id: str, image, text: str, options: list[str], answer: int, hint: str = "", **meta):
        return Sample(sample_id, image, format_question(text, options, hint), LETTERS[answer],
                      dict(meta, options=options))


class MMBench(MultipleChoice):
    name = "mmbench"

    def load(self, path: Path) -> list[Sample]:
        file = path if path.is_file() else find_file(path, ("*.tsv",), self.name)
        with open(file, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        samples = []
        for number, row in enumerate(rows, 2):
            where = f"mmbench: {file} line {number}"
            index = int(field_of(row, "index", where))
            if index >= 1_000_000:       # a rotated copy some releases include: rotations are made here
                continue
            options = [row[c] for c in LETTERS[:4] if row.get(c) not in (None, "", "nan")]
            answer = field_of(row, "answer", where, str).strip()
            if len(options) < 2 or answer not in LETTERS[:len(options)]:
                raise BenchmarkError(f"{where}: needs at least 2 options and an answer letter among them, "
                                     f"got options {options} and answer {answer!r}")
            try:
                image = base64.b64decode(field_of(row, "image", where, str), validate=True)
            except binascii.Error:
                raise BenchmarkError(f"{where}: 'image' is not base64") from None
            hint = row.get("hint") or ""
            hint = "" if hint == "nan" else hint
            for k, (opts, ans) in enumerate(rotations(options, LETTERS.index(answer))):
                samples.append(self.sample(f"{index}@{k}", image, field_of(row, "question", where, str), opts, ans,
                                           hint, question=str(index), rotation=k, category=row.get("category", "")))
        return samples

    def score(self, samples, predictions) -> dict[str, float]:
        return circular_accuracy(samples, predictions)


class SEEDBench(MultipleChoice):
    name = "seedbench"

    def load(self, path: Path) -> list[Sample]:
        file = path if path.is_file() else find_file(path, ("SEED-Bench*.json", "*.json"), self.name)
        root = (path if path.is_dir() else path.parent) / "images"
        samples = []
        for i, q in enumerate(field_of(read_json(file, self.name), "questions", str(file), list)):
            where = f"seedbench: {file} question {i}"
            if q.get("data_type", "image") != "image":
                continue
            options = [field_of(q, f"choice_{c}", where, str) for c in "abcd"]
            answer = field_of(q, "answer", where, str).strip()
            if answer not in LETTERS[:4]:
                raise BenchmarkError(f"{where}: answer must be A-D, got {answer!r}")
            samples.append(self.sample(str(field_of(q, "question_id", where)), str(root / field_of(q, "data_id", where, str)),
                                       field_of(q, "question", where, str), options, LETTERS.index(answer),
                                       question_type=q.get("question_type_id")))
        return samples


class ScienceQA(MultipleChoice):
    name = "scienceqa"

    def load(self, path: Path) -> list[Sample]:
        file = path / "problems.json" if path.is_dir() else path
        root = (path if path.is_dir() else path.parent) / "images"
        problems = read_json(file, self.name)
        if not isinstance(problems, dict):
            raise BenchmarkError(f"scienceqa: {file} must map problem ids to problems")
        samples = []
        for pid, p in problems.items():
            where = f"scienceqa: {file} problem {pid}"
            if p.get("split", "test") != "test" or not p.get("image"):
                continue
            choices = field_of(p, "choices", where, list)
            answer = field_of(p, "answer", where, int)
            if not 0 <= answer < len(choices):
                raise BenchmarkError(f"{where}: answer {answer} is not an index into its {len(choices)} choices")
            samples.append(self.sample(str(pid), str(root / "test" / str(pid) / p["image"]),
                                       field_of(p, "question", where, str), [str(c) for c in choices], answer,
                                       p.get("hint") or ""))
        return samples
