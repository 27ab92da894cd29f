"""tools/filter_dataset.py on the embedded data with planted problems: exact duplicates (the same
file or the same pixels in another file and format, the caption's spacing changed), near duplicates
(re-encoded, resized, cropped by 2 px a side) and mismatched captions, scored by the debug CLIP the
session trains (conftest.py: trained_clip). Each filter's precision and recall on the planted
cases, no good record dropped, the output in the input's format (captions, shards), resuming a
killed run, and the guards (never over the input, no mixing of two runs' measurements)."""
from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from megavlm.data.quality.pipeline import FilterError, FilterSettings, run_filter
from megavlm.data.records import open_source
from tests.conftest import ROOT, run_torchrun

COLOURS = {"red", "green", "blue", "yellow"}
BACKGROUNDS = {"white", "black", "gray"}
FILTERS = {"exact_duplicate": {"exact"}, "near_duplicate_image": {"reencoded", "resized", "cropped"},
           "low_similarity": {"mismatched"}}
DEDUP = ("exact_duplicate", "near_duplicate_image", "near_duplicate_caption")


def planted_captions(src: Path, out: Path, seed: int = 0) -> tuple[Path, dict[str, str]]:
    """One record per distinct caption of the embedded train split (distinct scenes), 20 of them
    given a caption sharing no colour and no background with their image, and copies of good
    records inserted after their originals: 15 exact, 30 near (10 each re-encoded at JPEG
    quality 60, resized to 80 or 160 px, cropped by 2 px a side). Returns the JSONL and each
    record id's label (good, mismatched, exact, reencoded, resized, cropped)."""
    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    base, seen = [], set()
    for line in (src / "captions_train.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["caption"] not in seen:
            seen.add(record["caption"])
            base.append(dict(record, image=str(src / record["image"])))
    labels = {r["id"]: "good" for r in base}
    for i in rng.sample(range(len(base)), 20):
        words = set(base[i]["caption"].split()) & (COLOURS | BACKGROUNDS)
        other = rng.choice([r["caption"] for r in base if not set(r["caption"].split()) & words])
        base[i] = dict(base[i], caption=other)
        labels[base[i]["id"]] = "mismatched"
    good = [r for r in base if labels[r["id"]] == "good"]
    copies = [(_exact_copy(r, k, out), r["id"]) for k, r in enumerate(rng.sample(good, 15))]
    copies += [(_near_copy(r, k, out), r["id"]) for k, r in enumerate(rng.sample(good, 30))]
    records = list(base)
    for copy, original in copies:
        position = next(i for i, r in enumerate(records) if r["id"] == original)
        records.insert(rng.randint(position + 1, len(records)), copy)
        labels[copy["id"]] = copy.pop("kind")
    path = out / "captions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, labels


def _exact_copy(record: dict, k: int, out: Path) -> dict:
    if k % 2 == 0:   # the same file, the same caption
        return {"id": f"exact_{k}", "image": record["image"], "caption": record["caption"], "kind": "exact"}
    image = out / "images" / f"exact_{k}.png"   # the same pixels in a PNG; the caption's spacing changed
    Image.open(record["image"]).save(image)
    return {"id": f"exact_{k}", "image": str(image), "caption": "  " + record["caption"].replace(" ", "  ") + " ",
            "kind": "exact"}


def _near_copy(record: dict, k: int, out: Path) -> dict:
    kind = ("reencoded", "resized", "cropped")[k % 3]
    image = Image.open(record["image"]).convert("RGB")
    if kind == "resized":
        image = image.resize((80, 80) if k % 2 else (160, 160), Image.BICUBIC)
    elif kind == "cropped":
        image = image.crop((2, 2, image.width - 2, image.height - 2))
    path = out / "images" / f"{kind}_{k}.jpg"
    image.save(path, quality=60 if kind == "reencoded" else 90)
    return {"id": f"{kind}_{k}", "image": str(path), "caption": record["caption"], "kind": kind}


def precision_recall(dropped: list[dict], labels: dict[str, str]) -> dict[str, tuple]:
    """Per filter: (precision, recall, flagged, planted) on the planted cases."""
    table = {}
    for reason, kinds in FILTERS.items():
        flagged = {d["id"] for d in dropped if d["reason"] == reason}
        planted = {i for i, kind in labels.items() if kind in kinds}
        hits = len(flagged & planted)
        table[reason] = (hits / max(len(flagged), 1), hits / len(planted), len(flagged), len(planted))
    return table


def _threshold(metrics: dict) -> float:
    """Half-way between the held-out mean similarity of matched and of shuffled pairs."""
    return round((metrics["similarity_matched"] + metrics["similarity_shuffled"]) / 2, 3)


@pytest.fixture(scope="module")
def planted(small_embedded, tmp_path_factory):
    return planted_captions(small_embedded, tmp_path_factory.mktemp("planted"))


@pytest.mark.multiproc
def test_filters_find_the_planted_records_under_torchrun(trained_clip, small_embedded, planted, tmp_path):
    ckpt, metrics = trained_clip
    path, labels = planted
    threshold = _threshold(metrics)
    run_torchrun(ROOT / "tools" / "filter_dataset.py", 2, [
        "--input", str(path), "--format", "captions", "--out", str(tmp_path), "--clip", str(ckpt),
        "--min-similarity", str(threshold), "--batch-size", "48"])
    dropped = [json.loads(line) for line in (tmp_path / "dropped.jsonl").read_text().splitlines()]
    table = precision_recall(dropped, labels)
    print(f"\n{len(labels)} records, min similarity {threshold} (held-out matched "
          f"{metrics['similarity_matched']:.3f}, shuffled {metrics['similarity_shuffled']:.3f})")
    for reason, (precision, recall, flagged, planted_count) in table.items():
        print(f"  {reason:<22} precision {precision:.3f} recall {recall:.3f} "
              f"({flagged} flagged, {planted_count} planted)")
    methods = Counter((labels[d["id"]], d.get("method")) for d in dropped if d["reason"] == "near_duplicate_image")
    print("  near duplicates by kind and detector:", dict(methods))
    (tmp_path / "precision_recall.json").write_text(json.dumps(table))
    for reason, (precision, recall, _, _) in table.items():
        assert precision >= 0.9 and recall >= 0.9, (reason, precision, recall)
    good_deduped = [d["id"] for d in dropped if labels[d["id"]] == "good" and d["reason"] in DEDUP]
    assert good_deduped == []
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["kept"] + summary["dropped"] == len(labels)
    assert sum(summary["dropped_by_reason"].values()) == len(dropped)
    assert (tmp_path / "similarity_histogram.png").is_file() and "histogram:" in (tmp_path / "summary.txt").read_text()
    kept = open_source(tmp_path / "captions.jsonl", "captions")   # image paths rewritten relative to the output
    assert len(kept) == summary["kept"] and all(kept[i].images[0].path.is_file() for i in range(len(kept)))
    assert {kept[i].sample_id for i in range(len(kept))} == set(labels) - {d["id"] for d in dropped}


def test_a_killed_run_continues_and_the_input_is_never_overwritten(trained_clip, planted, single_process, tmp_path):
    from megavlm.eval.clip_score import ClipScorer
    from megavlm.parallel.init import process_groups

    ckpt, metrics = trained_clip
    path, _ = planted
    scorer = ClipScorer.load(ckpt, process_groups(), single_process.device)
    settings = FilterSettings(min_similarity=_threshold(metrics), batch_size=64)
    before = path.read_bytes()
    with pytest.raises(FilterError, match="were not measured"):   # stopped after 2 of 5 batches: "killed"
        run_filter(path, "captions", tmp_path / "a", scorer, str(ckpt), settings, stop_after=2)
    measured = sorted(p.name for p in (tmp_path / "a" / "work").glob("batch-*.pt"))
    assert measured == ["batch-000000.pt", "batch-000001.pt"]
    stamps = {p: (tmp_path / "a" / "work" / p).stat().st_mtime_ns for p in measured}
    resumed = run_filter(path, "captions", tmp_path / "a", scorer, str(ckpt), settings)
    assert all((tmp_path / "a" / "work" / p).stat().st_mtime_ns == t for p, t in stamps.items())  # not redone
    whole = run_filter(path, "captions", tmp_path / "b", scorer, str(ckpt), settings)
    assert resumed["dropped_by_reason"] == whole["dropped_by_reason"]
    assert (tmp_path / "a" / "dropped.jsonl").read_text() == (tmp_path / "b" / "dropped.jsonl").read_text()
    assert path.read_bytes() == before
    with pytest.raises(FilterError, match="would overwrite the input"):
        run_filter(path, "captions", path.parent, scorer, str(ckpt), settings)
    with pytest.raises(FilterError, match="another run"):
        run_filter(path, "captions", tmp_path / "a", scorer, str(ckpt), FilterSettings(batch_size=32))


def test_shards_in_shards_out_and_capped_caption_groups(planted, tmp_path):
    """Shards are filtered into new shards (members copied); near-duplicate captions past
    max_caption_repeats are dropped (boilerplate on distinct images), every dropped record names
    the one it duplicates."""
    from megavlm.data.shards import write_shards

    import numpy as np

    path, labels = planted
    lines = path.read_text().splitlines()
    boilerplate = ["Click to enlarge", "click to enlarge!", "CLICK TO ENLARGE.", "click  to enlarge",
                   "Click to enlarge"]
    rng = np.random.default_rng(0)
    extra = []
    for k in range(10):   # ten distinct images (noise) under one caption, spelled five ways
        image = tmp_path / f"noise_{k}.png"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image)
        extra.append({"id": f"boilerplate_{k}", "image": str(image), "caption": boilerplate[k % 5]})
    source = tmp_path / "with_boilerplate.jsonl"
    source.write_text("\n".join(lines + [json.dumps(r) for r in extra]) + "\n")
    report = write_shards(source, "captions", tmp_path / "shards", samples_per_shard=128)
    summary = run_filter(tmp_path / "shards" / "index.json", "shards", tmp_path / "out",
                         settings=FilterSettings(max_caption_repeats=3, batch_size=128))
    dropped = [json.loads(line) for line in (tmp_path / "out" / "dropped.jsonl").read_text().splitlines()]
    capped = {d["id"] for d in dropped if d["reason"] == "near_duplicate_caption"}
    assert capped == {f"boilerplate_{k}" for k in range(3, len(extra))}
    assert all(d["duplicate_of"] for d in dropped)
    kept = open_source(tmp_path / "out" / "shards" / "index.json", "shards")
    assert len(kept) == summary["kept"] == report.samples - len(dropped)
    assert kept[len(kept) - 1].images[0].read("last") is not None


@pytest.mark.parametrize("fmt, name", [("conversations", "conversations_val.json"),
                                       ("interleaved", "interleaved_val.jsonl")])
def test_conversations_and_interleaved_come_out_in_their_own_format(small_embedded, tmp_path, fmt, name):
    """Duplicate filters only (no CLIP model): the output is the same format with image paths
    that resolve from the output directory; an interleaved record is scored image by image."""
    summary = run_filter(small_embedded / name, fmt, tmp_path)
    kept = open_source(tmp_path / name, fmt)
    original = open_source(small_embedded / name, fmt)
    assert summary["kept"] == len(kept) and summary["kept"] + summary["dropped"] == len(original)
    assert all(ref.path.is_file() for i in range(len(kept)) for ref in kept[i].images)
    assert [len(kept[i].images) for i in range(len(kept))] == [len(original[i].images) for i in range(len(kept))]


def test_the_scorer_reads_an_hf_siglip_directory_as_hf_scores_it(single_process, small_embedded, tmp_path):
    """--clip HF_DIR: the SiglipModel's weights through the clip adapter, pixels renormalised to
    SigLIP's statistics (mean and std 0.5), texts padded to its 32 positions: the cosine HF's own
    model gives for the same pixels and tokens."""
    import torch

    from megavlm.data.images import CLIP_MEAN, CLIP_STD
    from megavlm.eval.clip_score import ClipScorer
    from megavlm.models.registry import flavor_config
    from megavlm.parallel.init import process_groups
    from tests import clip_cases

    cfg = flavor_config("clip", "debug-siglip")
    clip_cases.hf_reference(cfg, seed=9).save_pretrained(tmp_path / "hf")
    hf = clip_cases.hf_model(cfg).__class__.from_pretrained(tmp_path / "hf").eval()
    scorer = ClipScorer.load(tmp_path / "hf", process_groups(), single_process.device,
                             tokenizer=str(small_embedded / "tokenizer.model"))
    records = [json.loads(line) for line in (small_embedded / "captions_val.jsonl").read_text().splitlines()[:4]]
    pixels = torch.stack(scorer.decode_images([(small_embedded / r["image"]).read_bytes() for r in records],
                                              [r["id"] for r in records]))
    texts = [r["caption"] for r in records]
    ours = scorer.similarity(pixels, texts)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    ids, _ = scorer.encode_texts(texts)
    with torch.no_grad():
        image = hf.get_image_features(pixel_values=(pixels * std + mean - 0.5) / 0.5).pooler_output
        text = hf.get_text_features(input_ids=ids).pooler_output
    ref = torch.nn.functional.cosine_similarity(image, text)
    assert ids.shape[1] == cfg.language.max_seq_len
    assert (ours - ref).abs().max().item() < 1e-5
