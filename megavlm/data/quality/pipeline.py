"""One filter run: measure every record (sharded over ranks, in batches saved as they finish),
then decide and write on rank 0.

Resuming: ``<out>/work/`` holds one file per finished batch and ``meta.json`` (input, format,
record count, batch size, CLIP model, hash size). A rerun of the same command measures only the
batches that are missing, so a killed run continues where it stopped; the decisions and outputs
are always recomputed from the saved signals, which also makes rerunning with other thresholds
(after looking at the histogram) cheap. A rerun whose inputs differ from ``meta.json`` stops
with the differences named, unless ``restart`` starts over.
"""
from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from megavlm.data.quality import dedup, report
from megavlm.data.quality.dataset import FilterInput, write_kept
from megavlm.data.quality.signals import THUMBNAIL, measure_batch


@dataclass
class FilterSettings:
    min_similarity: float | None = None      # drop records whose CLIP similarity is lower; None: score only
    dedup: bool = True
    hash_size: int = 16                      # pHash side per channel: 3 x 16 x 16 = 768 bits
    phash_radius: float | None = 100         # near-duplicate images within this Hamming distance
    thumbnail_threshold: float | None = 0.965  # near-duplicate images at this colour-thumbnail cosine
    embedding_threshold: float | None = None  # near-duplicate images at this CLIP-embedding cosine
    caption_threshold: float = 0.9           # near-duplicate captions at this 5-gram Jaccard similarity
    max_caption_repeats: int | None = None   # keep at most this many records per caption group; None: report only
    batch_size: int = 64


class FilterError(ValueError):
    """A filter run that cannot start or continue; the message says why."""


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def check_output(source: FilterInput, out_dir: Path) -> None:
    """The run never writes over its input."""
    inputs = {source.path.resolve()} | ({s.resolve() for s in source.shards.shards} if source.shards else set())
    outputs = ({(out_dir / "shards" / "index.json").resolve()} | set((out_dir / "shards").resolve().glob("*.tar"))
               if source.shards else {(out_dir / source.path.name).resolve()})
    clash = inputs & outputs
    if clash:
        raise FilterError(f"--out {out_dir} would overwrite the input ({sorted(map(str, clash))[0]}): "
                          f"choose another output directory")


def _meta(source: FilterInput, settings: FilterSettings, clip_model: str | None) -> dict:
    return {"input": str(source.path.resolve()), "format": source.fmt, "records": len(source),
            "batch_size": settings.batch_size, "hash_size": settings.hash_size, "thumbnail": THUMBNAIL,
            "clip_model": str(Path(clip_model).resolve()) if clip_model else None}


def prepare_work(work: Path, meta: dict, restart: bool, rank: int, barrier) -> None:
    """Rank 0 creates (or, with ``restart``, empties) the work folder; every rank then checks that
    a folder left by an earlier run was made for the same input and settings."""
    if rank == 0:
        if restart and work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        if not (work / "meta.json").is_file():
            _atomic_text(work / "meta.json", json.dumps(meta, indent=1))
    barrier()
    found = json.loads((work / "meta.json").read_text())
    changed = {k: (found.get(k), v) for k, v in meta.items() if found.get(k) != v}
    if changed:
        raise FilterError(f"{work} holds the measurements of another run (was -> now: {changed}); pass --restart to "
                          f"start over, or choose another --out")


def measure(source: FilterInput, work: Path, scorer, settings: FilterSettings, rank: int, world: int,
            stop_after: int | None = None, progress=None) -> int:
    """Measure this rank's batches (batch b is rank b % world's) that no earlier run finished;
    each is saved atomically as it ends. Returns the number measured now. ``stop_after``: stop
    after that many (a test's stand-in for a killed run)."""
    batches = -(-len(source) // settings.batch_size)
    done = 0
    for b in range(rank, batches, world):
        path = work / f"batch-{b:06d}.pt"
        if path.is_file():
            continue
        if stop_after is not None and done >= stop_after:
            break
        start = b * settings.batch_size
        items = [source.item(i) for i in range(start, min(start + settings.batch_size, len(source)))]
        signals = measure_batch(items, scorer, settings.hash_size)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(signals, tmp)
        os.replace(tmp, path)
        done += 1
        if progress is not None:
            progress(b, batches)
    return done


def load_signals(work: Path, records: int, batch_size: int) -> dict:
    """Every batch's signals, concatenated in input order."""
    batches = -(-records // batch_size)
    missing = [b for b in range(batches) if not (work / f"batch-{b:06d}.pt").is_file()]
    if missing:
        raise FilterError(f"{len(missing)} of {batches} batches were not measured (first: {missing[0]}); rerun the "
                          f"same command to finish them")
    parts = [torch.load(work / f"batch-{b:06d}.pt", weights_only=False) for b in range(batches)]
    out = {key: [v for p in parts for v in p[key]] for key in parts[0] if key not in ("phash", "thumbnail",
                                                                                      "embedding")}
    for key in ("phash", "thumbnail", "embedding"):
        if all(key in p for p in parts):
            out[key] = np.concatenate([p[key] for p in parts])
    return out


def decide(signals: dict, settings: FilterSettings, device) -> tuple[dict[int, dedup.Drop], list[dict]]:
    """Every dropped record with its reason: unusable, low CLIP similarity, then duplicates among
    the rest (the quality filters first, so a group of duplicates keeps its first good record)."""
    ids = dict(zip(signals["index"], signals["sample_id"]))
    drops: dict[int, dedup.Drop] = {}
    for index, error in zip(signals["index"], signals["error"]):
        if error is not None:
            drops[index] = dedup.Drop(index, error[0], None, {"message": error[1]})
    threshold = settings.min_similarity
    for index, score in zip(signals["index"], signals["similarity"]):
        if threshold is not None and index not in drops and score is not None and score < threshold:
            drops[index] = dedup.Drop(index, "low_similarity", round(score, 4))
    if not settings.dedup:
        return drops, []
    order = [i for i in signals["index"] if i not in drops]
    images: dict[int, list] = {}
    for record, digest in zip(signals["image_record"], signals["pixel_hash"]):
        images.setdefault(record, []).append(digest)
    drops.update(dedup.exact_duplicates(order, {k: tuple(v) for k, v in images.items()},
                                        dict(zip(signals["index"], signals["text_hash"])), ids))
    order = [i for i in order if i not in drops]
    detectors = _detectors(signals, settings, device)
    drops.update(dedup.near_duplicate_images(order, signals["image_record"], detectors, ids))
    order = [i for i in order if i not in drops]
    caption_drops, groups = dedup.near_duplicate_captions(order, dict(zip(signals["index"], signals["text"])), ids,
                                                          settings.caption_threshold, settings.max_caption_repeats)
    drops.update(caption_drops)
    return drops, groups


def _detectors(signals: dict, settings: FilterSettings, device) -> list[dedup.Detector]:
    detectors = []
    if settings.phash_radius is not None:
        detectors.append(dedup.HammingDetector(signals["phash"], settings.phash_radius, device))
    if settings.thumbnail_threshold is not None:
        detectors.append(dedup.CosineDetector("thumbnail", signals["thumbnail"], settings.thumbnail_threshold, device))
    if settings.embedding_threshold is not None:
        if "embedding" not in signals:
            raise FilterError("--embedding-threshold needs CLIP image embeddings: pass --clip")
        detectors.append(dedup.CosineDetector("clip_embedding", signals["embedding"], settings.embedding_threshold,
                                              device))
    return detectors


def write_outputs(source: FilterInput, out_dir: Path, signals: dict, drops: dict, groups: list[dict],
                  settings: FilterSettings, clip_model: str | None) -> dict:
    """The filtered dataset, dropped.jsonl, scores.jsonl, summary.json / summary.txt and the
    similarity histogram; returns the summary."""
    keep = [i for i in signals["index"] if i not in drops]
    dataset = write_kept(source, keep, out_dir)
    rows = []
    for index in sorted(drops):
        drop, raw = drops[index], source.raw_record(index)
        rows.append({"index": index, "id": signals["sample_id"][index], "reason": drop.reason, "score": drop.score,
                     **drop.detail, "record": raw if isinstance(raw, dict) else str(raw)})
    _atomic_text(out_dir / "dropped.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    scored = [(i, sid, s, p) for i, sid, s, p in zip(signals["index"], signals["sample_id"], signals["similarity"],
                                                     signals["pair_similarity"]) if s is not None]
    _atomic_text(out_dir / "scores.jsonl", "".join(
        json.dumps({"index": i, "id": sid, "similarity": round(s, 5), "pairs": [round(x, 5) for x in p]}) + "\n"
        for i, sid, s, p in scored))
    scores = np.array([s for _, _, s, _ in scored], dtype=np.float64)
    reasons = dict(Counter(d.reason for d in drops.values()).most_common())
    summary = {"input": str(source.path), "format": source.fmt, "records": len(source), "kept": len(keep),
               "dropped": len(drops), "dropped_by_reason": reasons,
               "output": str(dataset), "clip_model": clip_model, "similarity": report.similarity_summary(
                   scores, settings.min_similarity), "largest_caption_groups": groups, "settings": asdict(settings)}
    if scores.size:
        model = f" ({Path(clip_model).name})" if clip_model else ""
        report.histogram_png(scores, out_dir / "similarity_histogram.png", settings.min_similarity,
                             f"CLIP similarity of {scores.size} records{model}")
        summary["histogram"] = str(out_dir / "similarity_histogram.png")
    _atomic_text(out_dir / "summary.json", json.dumps(summary, indent=1))
    _atomic_text(out_dir / "summary.txt", report.summary_text(summary, scores))
    return summary


def run_filter(input_path: str | Path, fmt: str, out_dir: str | Path, scorer=None, clip_model: str | None = None,
               settings: FilterSettings | None = None, root: str | Path | None = None, rank: int = 0,
               world: int = 1, barrier=lambda: None, restart: bool = False, stop_after: int | None = None,
               progress=None) -> dict | None:
    """The whole run (collective over ``world`` ranks); the summary on rank 0, None elsewhere."""
    settings = settings or FilterSettings()
    source = FilterInput(input_path, fmt, root)
    out_dir = Path(out_dir)
    check_output(source, out_dir)
    work = out_dir / "work"
    prepare_work(work, _meta(source, settings, clip_model), restart, rank, barrier)
    measure(source, work, scorer, settings, rank, world, stop_after, progress)
    barrier()
    if rank != 0:
        return None
    signals = load_signals(work, len(source), settings.batch_size)
    device = scorer.device if scorer is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    drops, groups = decide(signals, settings, device)
    return write_outputs(source, out_dir, signals, drops, groups, settings, clip_model)
