"""Open-ended VQA (VQAv2, OK-VQA, TextVQA) with the official accuracy: an answer's accuracy is
the mean over the 10 leave-one-annotator-out subsets of min(1, matches / 3), after the official
normalisation (punctuation, digits, articles, contractions).

Files under ``path``: VQAv2 / OK-VQA: ``*questions*.json`` ({"questions": [{question_id,
image_id, question}]}) and ``*annotations*.json`` ({"annotations": [{question_id, answers:
[{answer}] x 10}]}); TextVQA: ``TextVQA_*.json`` ({"data": [{question_id, image_id, question,
answers: [10 strings]}]}). Images in ``path/images``: ``COCO_<split>_<id:012d>.jpg``,
``<id:012d>.jpg`` or ``<id>.jpg``.
"""
from __future__ import annotations

import re
from pathlib import Path

from megavlm.eval.benchmarks.base import Benchmark, BenchmarkError, Sample, field_of, find_file, read_json

PROMPT = "\nAnswer the question using a single word or phrase."

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or re.search(_COMMA_STRIP, text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, re.UNICODE)


def _digits_articles(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = NUMBERS.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """The official VQA evaluation's processing of an answer. The official script skips it when
    all ten ground-truth answers agree; it is applied to every answer here (as EvalAI's answer
    processor does), so "Two." matches "two" either way."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(text))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Mean over the 10 subsets leaving one annotator out of min(1, matches / 3)."""
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in answers]
    scores = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]
        scores.append(min(1.0, sum(g == pred for g in others) / 3.0))
    return sum(scores) / len(scores) if scores else 0.0


def image_for(root: Path, image_id) -> Path:
    """COCO-style names tried in order; the first that exists (else the first, to be reported missing)."""
    names = [str(image_id), f"{image_id}.jpg"]
    if isinstance(image_id, int) or str(image_id).isdigit():
        n = int(image_id)
        names = [f"COCO_val2014_{n:012d}.jpg", f"COCO_train2014_{n:012d}.jpg", f"{n:012d}.jpg", f"{n}.jpg"]
    for name in names:
        if (root / name).is_file():
            return root / name
    return root / names[-1]


class VQA(Benchmark):
    max_new_tokens = 10

    def __init__(self, name: str):
        self.name = name

    def load(self, path: Path) -> list[Sample]:
        textvqa = list(path.glob("TextVQA_*.json")) if path.is_dir() else []
        return self._load_textvqa(path, textvqa[0]) if textvqa else self._load_vqav2(path)

    def _load_vqav2(self, path: Path) -> list[Sample]:
        qfile = find_file(path, ("*questions*.json",), self.name)
        afile = find_file(path, ("*annotations*.json",), self.name)
        questions = field_of(read_json(qfile, self.name), "questions", str(qfile), list)
        annotations = field_of(read_json(afile, self.name), "annotations", str(afile), list)
        answers = {}
        for i, ann in enumerate(annotations):
            where = f"{self.name}: {afile} annotation {i}"
            answers[field_of(ann, "question_id", where)] = [field_of(a, "answer", where, str)
                                                            for a in field_of(ann, "answers", where, list)]
        samples = []
        for i, q in enumerate(questions):
            where = f"{self.name}: {qfile} question {i}"
            qid = field_of(q, "question_id", where)
            if qid not in answers:
                raise BenchmarkError(f"{where}: question_id {qid} has no annotation in {afile}")
            samples.append(Sample(str(qid), str(image_for(path / "images", field_of(q, "image_id", where))),
                                  field_of(q, "question", where, str) + PROMPT, answers[qid]))
        return samples

    def _load_textvqa(self, path: Path, file: Path) -> list[Sample]:
        data = field_of(read_json(file, self.name), "data", str(file), list)
        samples = []
        for i, q in enumerate(data):
            where = f"{self.name}: {file} record {i}"
            samples.append(Sample(str(field_of(q, "question_id", where)),
                                  str(image_for(path / "images", field_of(q, "image_id", where))),
                                  field_of(q, "question", where, str) + PROMPT, field_of(q, "answers", where, list)))
        return samples

    def score(self, samples, predictions) -> dict[str, float]:
        scores = [vqa_accuracy(p, s.reference) for s, p in zip(samples, predictions)]
        return {"accuracy": sum(scores) / len(scores)}
