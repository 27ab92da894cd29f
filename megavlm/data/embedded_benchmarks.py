"""Small versions of the standard benchmarks, in their published file formats, from scenes of
the embedded dataset whose content is known, so every metric runs in CI and means something:

  benchmarks/vqav2/               VQAv2 questions + annotations JSON, 10 answers per question
  benchmarks/coco_captions/       Karpathy-split JSON, 5 reference captions per image
  benchmarks/pope/                coco_pope_{random,popular,adversarial}.json: objects present / absent
  benchmarks/mmbench/             MMBench TSV (base64 images): 4 options, circular evaluation
  benchmarks/seedbench/           SEED-Bench JSON, 4 choices
  benchmarks/scienceqa/           ScienceQA problems.json, 2-4 choices, hint
  benchmarks/refcoco/             refs(unc).p + instances.json: one true box per expression
  benchmarks/flickr30k_retrieval/ Karpathy-split JSON for image-text retrieval
  benchmark_instruct_train.json   the same kinds of questions on training scenes (LLaVA
                                  conversations), for the instruction-tuning mixture
  existence_train.json            POPE-style questions (a present and an absent object) on
                                  scenes of their own: the decision needs many more scenes than
                                  the other kinds

Scenes come from their own random stream, so the rest of the embedded dataset is unchanged.
"""
from __future__ import annotations

import base64
import csv
import io
import json
import pickle
import random
from pathlib import Path

from megavlm.data import embedded as E
from megavlm.eval.benchmarks.captions import PROMPT as CAPTION_PROMPT
from megavlm.eval.benchmarks.multiple_choice import LETTERS, format_question
from megavlm.eval.benchmarks.pope import PROMPT as SHORT_ANSWER
from megavlm.eval.benchmarks.refcoco import PROMPT as REC_PROMPT

COUNTS = ("one", "two", "three", "four")
NUMERALS = {"one": "1", "two": "2", "three": "3"}


def _scenes(rng: random.Random, count: int) -> list[tuple[dict, bytes, list]]:
    out = []
    for _ in range(count):
        scene = E._group_scene(rng) if rng.random() < 0.6 else E._pair_scene(rng)
        image, boxes = E.render_with_boxes(scene, rng)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=92)
        out.append((scene, buffer.getvalue(), boxes))
    return out


def objects(scene: dict) -> set[tuple[str, str]]:
    if scene["kind"] == "group":
        return {(scene["color"], scene["shape"])}
    return {scene["left"], scene["right"]}


def _name(obj: tuple[str, str]) -> str:
    return f"{obj[0]} {obj[1]}"


# ---- question makers (shared by the benchmarks and the instruction data) ----------------------
def vqa_answers(answer: str, rng: random.Random) -> list[str]:
    """Ten annotators: the answer in a few surface forms, and up to two wrong ones (so the truth
    still scores 1, and a wrong answer some annotators gave scores 1/3 or 2/3)."""
    forms = [answer, answer.capitalize(), answer + "."] + ([NUMERALS[answer]] if answer in NUMERALS else [])
    if answer.startswith("a "):
        forms.append(answer[2:])
    wrong = rng.choice([c for c in list(E.COLORS) + list(E.SHAPES) + list(NUMERALS) if c not in answer])
    answers = [rng.choice(forms) for _ in range(10)]
    for slot in rng.sample(range(10), rng.choice([0, 0, 1, 2])):
        answers[slot] = wrong
    return answers


def pope_questions(scene: dict, rng: random.Random, split: str, frequent: list) -> list[tuple[tuple, str, str]]:
    """((colour, shape), question, yes/no) for one present and one absent object: absent at random, among
    the most frequent objects, or a near miss (the colour or the shape of a present object changed)."""
    present = objects(scene)
    everything = [(c, s) for c in E.COLORS for s in E.SHAPES]
    absent = [o for o in everything if o not in present]
    if split == "popular":
        pool = [o for o in frequent if o not in present][:4]
    elif split == "adversarial":
        pool = [o for o in absent if any(o[0] == p[0] or o[1] == p[1] for p in present)]
    else:
        pool = absent
    yes = rng.choice(sorted(present))
    no = rng.choice(pool or absent)
    return [(obj, f"Is there a {_name(obj)} in the image?", label) for obj, label in ((yes, "yes"), (no, "no"))]


def existence_answer(obj: tuple[str, str], label: str) -> str:
    """The object's shape, its colour, then yes or no ("square yellow no"; POPE's rule reads the
    no). A small LLM decides right after reading the colour word: from there it looks up the
    objects of that colour as it does when captioning, and compares their shape with the one it
    just wrote. Asked for a bare yes/no, or for "yellow square: no", the debug LLM stays at chance
    for over a thousand steps."""
    return f"{obj[1]} {obj[0]} {label}"


def existence_pairs(scene: dict, rng: random.Random) -> list[tuple[str, str]]:
    """(prompt, answer) for a present and an absent object (random or near-miss absent)."""
    split = rng.choice(["random", "adversarial"])
    return [(q + SHORT_ANSWER, existence_answer(obj, label)) for obj, q, label in pope_questions(scene, rng, split, [])]


def choice_question(scene: dict, rng: random.Random) -> tuple[str, list[str], int, str]:
    """(question, 4 options, answer index, hint) about colour, count, shape or position."""
    if scene["kind"] == "group":
        kind = rng.choice(["color", "count", "shape"])
        if kind == "count":
            truth, pool, q = E.COUNT_WORDS[scene["count"]], list(COUNTS), f"How many {scene['shape']}s are there?"
        elif kind == "color":
            truth, pool, q = scene["color"], list(E.COLORS), f"What color are the {scene['shape']}s?"
        else:
            truth, pool, q = scene["shape"], list(E.SHAPES) + ["star"], f"What shape is the {scene['color']} object?"
        hint = f"The background is {scene['background']}."
    else:
        (c1, s1), (c2, s2) = scene["left"], scene["right"]
        q, truth = f"What is to the left of the {s2}?", f"a {c1} {s1}"
        others = [f"a {c} {s}" for c in E.COLORS for s in E.SHAPES if (c, s) != (c1, s1)]
        pool = [truth] + rng.sample(others, 3)
        hint = ""
    options = [truth] + rng.sample([o for o in pool if o != truth], 3)
    rng.shuffle(options)
    return q, options, options.index(truth), hint


def referring(scene: dict, boxes: list) -> list[tuple[str, list[float]]]:
    """Expressions that name exactly one shape, with its box in pixels."""
    if scene["kind"] == "pair":
        (left, right) = boxes
        return [(f"the {left[0]} {left[1]} on the left", left[2]), (f"the {right[0]} {right[1]}", right[2])]
    if scene["count"] == 1:
        return [(f"the {boxes[0][0]} {boxes[0][1]}", boxes[0][2])]
    return []


def box_text(box: list[float], size: int) -> str:
    return "[" + ", ".join(f"{v / size:.2f}" for v in box) + "]"


def caption_variants(scene: dict) -> list[str]:
    base = E.caption(scene)
    bg = scene["background"]
    body = base[: -len(f" on a {bg} background")]
    return [base, f"{body} against a {bg} background", f"a {bg} background with {body}",
            f"there is {body} on a {bg} background" if body.startswith("a ") else f"there are {body} on a {bg} background",
            f"{body}"]


# ---- writers ----------------------------------------------------------------------------------
def _image_dir(root: Path, scenes, name) -> list[str]:
    (root / "images").mkdir(parents=True, exist_ok=True)
    files = []
    for i, (_, data, _) in enumerate(scenes):
        file = name(i)
        (root / "images" / file).parent.mkdir(parents=True, exist_ok=True)
        (root / "images" / file).write_bytes(data)
        files.append(file)
    return files


def write_vqav2(root: Path, scenes, rng) -> None:
    _image_dir(root, scenes, lambda i: f"COCO_val2014_{i:012d}.jpg")
    questions, annotations = [], []
    for i, (scene, _, _) in enumerate(scenes):
        for k, (question, answer) in enumerate(rng.sample(E.questions(scene), 2)):
            qid = i * 10 + k
            questions.append({"image_id": i, "question": question, "question_id": qid})
            annotations.append({"question_id": qid, "image_id": i, "multiple_choice_answer": answer,
                                "answer_type": "number" if answer in COUNTS else "other", "question_type": "what",
                                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                            for j, a in enumerate(vqa_answers(answer, rng))]})
    (root / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps({"questions": questions}))
    (root / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": annotations}))


def _karpathy(root: Path, scenes, file: str) -> None:
    names = _image_dir(root, scenes, lambda i: f"val2014/COCO_val2014_{i:012d}.jpg")
    images = [{"filepath": "val2014", "filename": Path(n).name, "split": "test", "cocoid": i, "imgid": i,
               "sentences": [{"raw": c, "tokens": c.split()} for c in caption_variants(scene)]}
              for i, ((scene, _, _), n) in enumerate(zip(scenes, names))]
    (root / file).write_text(json.dumps({"images": images, "dataset": "coco"}))


def write_pope(root: Path, scenes, rng) -> None:
    names = _image_dir(root, scenes, lambda i: f"COCO_val2014_{i:012d}.jpg")
    counts: dict = {}
    for scene, _, _ in scenes:
        for o in objects(scene):
            counts[o] = counts.get(o, 0) + 1
    frequent = sorted(counts, key=lambda o: -counts[o])
    for split in ("random", "popular", "adversarial"):
        with open(root / f"coco_pope_{split}.json", "w") as f:
            qid = 0
            for (scene, _, _), name in zip(scenes, names):
                for _, text, label in pope_questions(scene, rng, split, frequent):
                    qid += 1
                    f.write(json.dumps({"question_id": qid, "image": name, "text": text, "label": label}) + "\n")


def write_mmbench(root: Path, scenes, rng) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "mmbench_dev_en.tsv", "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"])
        for i, (scene, data, _) in enumerate(scenes):
            q, options, answer, hint = choice_question(scene, rng)
            writer.writerow([i, q, hint or "nan", *options, LETTERS[answer], scene["kind"],
                             base64.b64encode(data).decode()])


def write_seedbench(root: Path, scenes, rng) -> None:
    names = _image_dir(root, scenes, lambda i: f"{i:06d}.jpg")
    out = []
    for i, ((scene, _, _), name) in enumerate(zip(scenes, names)):
        q, options, answer, _ = choice_question(scene, rng)
        out.append({"question_id": str(i), "question": q, **{f"choice_{c}": o for c, o in zip("abcd", options)},
                    "answer": LETTERS[answer], "data_id": name, "data_type": "image", "question_type_id": 1})
    (root / "SEED-Bench.json").write_text(json.dumps({"questions": out, "question_type": {"Instance Attributes": 1}}))


def write_scienceqa(root: Path, scenes, rng) -> None:
    problems = {}
    for i, (scene, data, _) in enumerate(scenes):
        pid = str(1000 + i)
        (root / "images" / "test" / pid).mkdir(parents=True, exist_ok=True)
        (root / "images" / "test" / pid / "image.png").write_bytes(data)   # the published name; JPEG bytes
        q, options, answer, hint = choice_question(scene, rng)
        keep = rng.randint(2, 4)
        chosen = [answer] + rng.sample([j for j in range(4) if j != answer], keep - 1)
        chosen.sort()
        problems[pid] = {"question": q, "choices": [options[j] for j in chosen], "answer": chosen.index(answer),
                         "hint": hint, "image": "image.png", "split": "test", "subject": "natural science",
                         "grade": "grade1"}
    (root / "problems.json").write_text(json.dumps(problems))


def write_refcoco(root: Path, scenes, size: int) -> None:
    names = _image_dir(root, scenes, lambda i: f"COCO_train2014_{i:012d}.jpg")
    refs, anns, images = [], [], []
    for i, ((scene, _, boxes), name) in enumerate(zip(scenes, names)):
        images.append({"id": i, "width": size, "height": size, "file_name": name})
        for expression, (x1, y1, x2, y2) in referring(scene, boxes):
            ann = len(anns)
            anns.append({"id": ann, "image_id": i, "bbox": [x1, y1, x2 - x1, y2 - y1], "category_id": 1})
            refs.append({"ref_id": len(refs), "ann_id": ann, "image_id": i, "file_name": name, "split": "val",
                         "sentences": [{"sent": expression, "raw": expression}], "category_id": 1})
    with open(root / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f)
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                      "categories": [{"id": 1, "name": "shape"}]}))


def every_kind_pairs(scene: dict, boxes: list, rng: random.Random, size: int) -> list[tuple[str, str]]:
    """Every kind of benchmark question about a scene: a short answer, a present and an absent
    object, lettered options, a box, a caption."""
    question, answer = rng.choice(E.questions(scene))
    pairs = [(question + SHORT_ANSWER, answer)] + existence_pairs(scene, rng)
    q, options, answer_index, hint = choice_question(scene, rng)
    pairs.append((format_question(q, options, hint), LETTERS[answer_index]))
    if referring(scene, boxes):
        expression, box = rng.choice(referring(scene, boxes))
        pairs.append((REC_PROMPT.format(expression), box_text(box, size)))
    pairs.append((CAPTION_PROMPT, E.caption(scene)))
    return pairs


def one_turn_records(scenes, out: Path, name: str, pairs_of) -> list[dict]:
    """Each scene's image under ``images/<name>/`` and one LLaVA conversation per (prompt, answer)
    of ``pairs_of(scene, boxes)``, sharing the image."""
    (out / "images" / name).mkdir(parents=True, exist_ok=True)
    records = []
    for i, (scene, data, boxes) in enumerate(scenes):
        rel = f"images/{name}/{name}_{i:05d}.jpg"
        (out / rel).write_bytes(data)
        for k, (question, answer) in enumerate(pairs_of(scene, boxes)):
            records.append({"id": f"{name}_{i:05d}_{k}", "image": rel, "conversations": [
                {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]})
    return records


def generate_benchmarks(out: Path, seed: int, images: int = 64, train_images: int = 600,
                        existence_images: int = 3000) -> list[str]:
    """Write every benchmark under ``out/benchmarks`` and the instruction data; returns their text
    (for the tokenizer's corpus)."""
    rng = random.Random(f"benchmarks-{seed}")
    root = out / "benchmarks"
    size = E.IMAGE_SIZE
    write_vqav2(root / "vqav2", _scenes(rng, images), rng)
    _karpathy(root / "coco_captions", _scenes(rng, images), "dataset_coco.json")
    write_pope(root / "pope", _scenes(rng, images), rng)
    write_mmbench(root / "mmbench", _scenes(rng, images), rng)
    write_seedbench(root / "seedbench", _scenes(rng, images), rng)
    write_scienceqa(root / "scienceqa", _scenes(rng, images), rng)
    write_refcoco(root / "refcoco", _scenes(rng, images), size)
    _karpathy(root / "flickr30k_retrieval", _scenes(rng, images // 2), "dataset_flickr30k.json")
    records = one_turn_records(_scenes(rng, train_images), out, "bench_train",
                               lambda scene, boxes: every_kind_pairs(scene, boxes, rng, size))
    (out / "benchmark_instruct_train.json").write_text(json.dumps(records, indent=1))
    existence_rng = random.Random(f"existence-{seed}")
    existence = one_turn_records(_scenes(existence_rng, existence_images), out, "existence_train",
                                 lambda scene, _: existence_pairs(scene, existence_rng))
    (out / "existence_train.json").write_text(json.dumps(existence, indent=1))
    texts = [t["value"].replace("<image>\n", "") for r in records for t in r["conversations"]]
    return texts + [f"{NUMERALS[n]} {n.capitalize()}." for n in NUMERALS] + ["Hint: star four Answer"]
