"""The embedded dataset: JPEG scenes of coloured shapes whose content is known, so learning to use
the image is measurable (accuracy with the image vs the same model given a blank image).

Writes, under ``--out``:
  images/{split}/{id}.jpg            scenes on white, black or gray backgrounds
  captions_{split}.jsonl             {"image", "caption"} for stages 1-2 (feature alignment, pre-training)
  conversations_{split}.json         LLaVA-style {"image", "conversations": [human/gpt turns]} for stage 3
  interleaved_{split}.jsonl          documents of 2-4 images, each followed by its caption (Flamingo-style)
  tokenizer.model                    sentencepiece model trained on all the text, with byte fallback (any
                                     character of a user's own captions is spelled in UTF-8 bytes, never
                                     unknown); "<image>", the Llama-3 markers, "[DEC]" (BLIP-2) and
                                     "<|endofchunk|>" (Flamingo) are single tokens
  benchmarks/, benchmark_instruct_train.json, existence_train.json
                                     small standard benchmarks in their published formats, and
                                     benchmark-style instruction data (data/embedded_benchmarks.py)
  manifest.json                      counts, seed and generator version

Scenes are either a group (1-3 shapes of one colour and kind: "two red circles on a white
background") or a pair side by side ("a blue square to the left of a green triangle ...").
Questions ask for counts, colours, shapes and left/right relations.

    python -m megavlm.data.embedded --out data/embedded
"""
from __future__ import annotations

import argparse
import io
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from megavlm.data.tokenizer import END_OF_CHUNK

VERSION = 8
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
SPLITS = {"train": 3000, "val": 200, "test": 200}
IMAGE_SIZE = 112


def _plural(shape: str, count: int) -> str:
    return shape if count == 1 else shape + "s"


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, color) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.85), (cx + r, cy + r * 0.85)], fill=color)


def _group_scene(rng: random.Random) -> dict:
    return {"kind": "group", "count": rng.randint(1, 3), "color": rng.choice(list(COLORS)),
            "shape": rng.choice(SHAPES), "background": rng.choice(list(BACKGROUNDS))}


def _pair_scene(rng: random.Random) -> dict:
    left, right = rng.sample(SHAPES, 2)
    c_left, c_right = rng.sample(list(COLORS), 2)
    return {"kind": "pair", "left": (c_left, left), "right": (c_right, right),
            "background": rng.choice(list(BACKGROUNDS))}


def render(scene: dict, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    return render_with_boxes(scene, rng, size)[0]


def render_with_boxes(scene: dict, rng: random.Random, size: int = IMAGE_SIZE) -> tuple[Image.Image, list[tuple]]:
    """The image and each shape's (colour, shape, [x1, y1, x2, y2]) in pixels, in drawing order."""
    image = Image.new("RGB", (size, size), BACKGROUNDS[scene["background"]])
    draw = ImageDraw.Draw(image)
    r = size * rng.uniform(0.10, 0.14)
    boxes = []
    if scene["kind"] == "group":
        n = scene["count"]
        slots = rng.sample(range(4), n)  # quadrant-ish slots keep shapes apart
        for slot in slots:
            cx = size * (0.28 + 0.44 * (slot % 2)) + rng.uniform(-3, 3)
            cy = size * (0.28 + 0.44 * (slot // 2)) + rng.uniform(-3, 3)
            _draw_shape(draw, scene["shape"], cx, cy, r, COLORS[scene["color"]])
            boxes.append((scene["color"], scene["shape"], _box(scene["shape"], cx, cy, r)))
    else:
        cy = size * rng.uniform(0.35, 0.65)
        for (color, shape), cx in ((scene["left"], size * 0.27), (scene["right"], size * 0.73)):
            x, y = cx + rng.uniform(-3, 3), cy + rng.uniform(-4, 4)
            _draw_shape(draw, shape, x, y, r, COLORS[color])
            boxes.append((color, shape, _box(shape, x, y, r)))
    return image, boxes


def _box(shape: str, cx: float, cy: float, r: float) -> list[float]:
    return [cx - r, cy - r, cx + r, cy + r * (0.85 if shape == "triangle" else 1.0)]


def caption(scene: dict) -> str:
    bg = scene["background"]
    if scene["kind"] == "group":
        n = scene["count"]
        return f"{COUNT_WORDS[n]} {scene['color']} {_plural(scene['shape'], n)} on a {bg} background"
    (c1, s1), (c2, s2) = scene["left"], scene["right"]
    return f"a {c1} {s1} to the left of a {c2} {s2} on a {bg} background"


def questions(scene: dict) -> list[tuple[str, str]]:
    if scene["kind"] == "group":
        n, color, shape = scene["count"], scene["color"], scene["shape"]
        return [
            (f"How many {color} {shape}s are there?", COUNT_WORDS[n]),
            (f"What color {'is the ' + shape if n == 1 else 'are the ' + shape + 's'}?", color),
            (f"What shape is the {color} object?", shape),
            ("What color is the background?", scene["background"]),
        ]
    (c1, s1), (c2, s2) = scene["left"], scene["right"]
    return [
        (f"What is to the left of the {s2}?", f"a {c1} {s1}"),
        (f"What is to the right of the {s1}?", f"a {c2} {s2}"),
        (f"What color is the {s1}?", c1),
        (f"What shape is on the right?", s2),
    ]


def conversation(scene: dict, rng: random.Random, turns: int = 2) -> list[dict]:
    picked = rng.sample(questions(scene), turns)
    out = []
    for i, (question, answer) in enumerate(picked):
        text = f"<image>\n{question}" if i == 0 else question
        out += [{"from": "human", "value": text}, {"from": "gpt", "value": answer}]
    return out


def _write_split(out: Path, split: str, count: int, rng: random.Random) -> tuple[list[dict], list[dict]]:
    image_dir = out / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    captions, convs = [], []
    for i in range(count):
        scene = _group_scene(rng) if rng.random() < 0.6 else _pair_scene(rng)
        rel = f"images/{split}/{split}_{i:05d}.jpg"
        buffer = io.BytesIO()
        render(scene, rng).save(buffer, format="JPEG", quality=92)
        (out / rel).write_bytes(buffer.getvalue())
        captions.append({"id": f"{split}_{i:05d}", "image": rel, "caption": caption(scene)})
        convs.append({"id": f"{split}_{i:05d}", "image": rel, "conversations": conversation(scene, rng)})
    with open(out / f"captions_{split}.jsonl", "w") as f:
        for record in captions:
            f.write(json.dumps(record) + "\n")
    (out / f"conversations_{split}.json").write_text(json.dumps(convs, indent=1))
    _write_interleaved(out / f"interleaved_{split}.jsonl", captions, random.Random(f"interleaved-{split}"))
    return captions, convs


def _write_interleaved(path: Path, captions: list[dict], rng: random.Random) -> None:
    """Consecutive scenes grouped into documents: <image> caption <image> caption ..."""
    with open(path, "w") as f:
        start = 0
        while start < len(captions):
            group = captions[start: start + rng.randint(2, 4)]
            content = [item for c in group for item in ({"image": c["image"]}, {"text": c["caption"]})]
            f.write(json.dumps({"id": f"doc_{group[0]['id']}", "content": content}) + "\n")
            start += len(group)


def _train_tokenizer(out: Path, texts: list[str], vocab_size: int) -> None:
    import sentencepiece as spm

    corpus = out / "tokenizer_corpus.txt"
    corpus.write_text("\n".join(texts) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        user_defined_symbols=["<image>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "[DEC]",
                              END_OF_CHUNK],
        character_coverage=1.0, hard_vocab_limit=False, byte_fallback=True,
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2, num_threads=1,
    )
    corpus.unlink()


def generate(out: str | Path, seed: int = 0, splits: dict[str, int] | None = None, vocab_size: int = 768,
             benchmark_images: int = 64) -> dict:
    """Write the dataset (deterministic for a seed); returns the manifest."""
    from megavlm.data.embedded_benchmarks import generate_benchmarks
    from megavlm.data.templates import TEMPLATES

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    counts, texts = {}, []
    for split, count in (splits or SPLITS).items():
        captions, convs = _write_split(out, split, count, rng)
        counts[split] = count
        texts += [c["caption"] for c in captions]
        texts += [turn["value"].replace("<image>\n", "") for conv in convs for turn in conv["conversations"]]
    texts += [t.system + " " + t.user + " " + t.assistant for t in TEMPLATES.values()]
    # The benchmarks' text is left out of the tokenizer's corpus: its many question forms would take
    # the merges that keep the conversations short (byte fallback spells whatever is missing).
    train = counts.get("train", 0)
    generate_benchmarks(out, seed, benchmark_images, train_images=max(benchmark_images, train // 4),
                        existence_images=train)
    _train_tokenizer(out, texts, vocab_size)
    manifest = {"version": VERSION, "seed": seed, "splits": counts, "image_size": IMAGE_SIZE,
                "tokenizer": "tokenizer.model", "benchmark_images": benchmark_images}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def ensure(out: str | Path, seed: int = 0) -> Path:
    """Generate once: reuse ``out`` when its manifest matches this generator version and seed."""
    out = Path(out)
    manifest = out / "manifest.json"
    if manifest.is_file():
        found = json.loads(manifest.read_text())
        if found.get("version") == VERSION and found.get("seed") == seed:
            return out
    generate(out, seed)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/embedded")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    manifest = generate(args.out, args.seed)
    print(f"wrote {args.out}: {manifest['splits']}")


if __name__ == "__main__":
    main()
