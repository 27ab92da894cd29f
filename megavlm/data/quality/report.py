"""What a filter run reports: the CLIP-similarity histogram (a PNG and a text version, so a
threshold can be chosen from the scores), quantiles, how many records common thresholds would
drop, counts by reason and the largest near-duplicate caption groups."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

BINS = 40
REFERENCE_THRESHOLDS = (0.20, 0.25, 0.28, 0.30)   # "< 0.25 a bad pair", "> 0.28 alignment data"


def histogram(scores: np.ndarray, bins: int = BINS) -> tuple[np.ndarray, np.ndarray]:
    low, high = (float(scores.min()), float(scores.max())) if scores.size else (0.0, 1.0)
    if high - low < 1e-6:
        low, high = low - 0.05, high + 0.05
    return np.histogram(scores, bins=bins, range=(low, high))


def histogram_png(scores: np.ndarray, path, threshold: float | None, title: str) -> None:
    """Bars of the score histogram, axes with ticks, the threshold as a red line."""
    counts, edges = histogram(scores)
    width, height, left, right, top, bottom = 800, 480, 70, 20, 50, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max(int(counts.max()), 1) if counts.size else 1
    x_of = lambda v: left + (v - edges[0]) / (edges[-1] - edges[0]) * plot_w   # noqa: E731
    for count, a, b in zip(counts, edges[:-1], edges[1:]):
        bar_top = top + plot_h * (1 - count / peak)
        draw.rectangle([x_of(a) + 1, bar_top, x_of(b) - 1, top + plot_h], fill=(70, 110, 200))
    draw.line([left, top + plot_h, left + plot_w, top + plot_h], fill="black")
    draw.line([left, top, left, top + plot_h], fill="black")
    for k in range(6):
        value = edges[0] + k / 5 * (edges[-1] - edges[0])
        draw.line([x_of(value), top + plot_h, x_of(value), top + plot_h + 5], fill="black")
        draw.text((x_of(value) - 14, top + plot_h + 8), f"{value:.2f}", fill="black")
        count = round(k / 5 * peak)
        y = top + plot_h * (1 - k / 5)
        draw.line([left - 5, y, left, y], fill="black")
        draw.text((left - 45, y - 6), str(count), fill="black")
    if threshold is not None and edges[0] <= threshold <= edges[-1]:
        draw.line([x_of(threshold), top, x_of(threshold), top + plot_h], fill=(220, 30, 30), width=2)
        draw.text((x_of(threshold) + 4, top + 4), f"min similarity {threshold:g}", fill=(220, 30, 30))
    draw.text((left, 15), title, fill="black")
    draw.text((left + plot_w // 2 - 60, height - 25), "CLIP similarity (cosine)", fill="black")
    image.save(path)


def text_histogram(scores: np.ndarray, bins: int = 20, width: int = 50) -> list[str]:
    counts, edges = histogram(scores, bins)
    peak = max(int(counts.max()), 1) if counts.size else 1
    return [f"  [{a:+.3f}, {b:+.3f})  {c:7d}  {'#' * round(width * c / peak)}"
            for c, a, b in zip(counts, edges[:-1], edges[1:])]


def similarity_summary(scores: np.ndarray, threshold: float | None) -> dict:
    if not scores.size:
        return {"pairs_scored": 0}
    quantiles = {f"p{q}": round(float(np.percentile(scores, q)), 4) for q in (1, 5, 10, 25, 50, 75, 90, 95, 99)}
    below = {f"< {t:g}": int((scores < t).sum()) for t in sorted(set(REFERENCE_THRESHOLDS) | ({threshold} - {None}))}
    return {"records_scored": int(scores.size), "mean": round(float(scores.mean()), 4), **quantiles,
            "records_below": below}


def summary_text(summary: dict, scores: np.ndarray) -> str:
    lines = [f"input: {summary['input']} ({summary['format']}), {summary['records']} records",
             f"kept: {summary['kept']}, dropped: {summary['dropped']}", "dropped by reason:"]
    lines += [f"  {reason:<24} {count}" for reason, count in summary["dropped_by_reason"].items()] or ["  (none)"]
    similarity = summary.get("similarity")
    if similarity and similarity.get("records_scored"):
        lines += ["", f"CLIP similarity of each record (its worst image-text pair), model {summary['clip_model']}:",
                  "  mean {mean}, quantiles: ".format(**similarity)
                  + ", ".join(f"{k} {v}" for k, v in similarity.items() if k.startswith("p")),
                  "  records below: " + ", ".join(f"{k}: {v}" for k, v in similarity["records_below"].items()),
                  "  histogram:"] + text_histogram(scores)
    groups = summary.get("largest_caption_groups") or []
    if groups:
        lines += ["", "largest near-duplicate caption groups (records):"]
        lines += [f"  {g['records']:6d}  {g['caption'][:80]!r}" for g in groups]
    lines += ["", "settings: " + ", ".join(f"{k}={v}" for k, v in summary["settings"].items())]
    return "\n".join(lines) + "\n"
