"""Light, stage-2-only augmentation decided per sample before tokenisation.

RandomResizedCrop (area 0.8-1.0), brightness/contrast jitter (±0.1) and a horizontal flip. A flip
mirrors left and right, so it is applied only when the text mentions neither, or with the words
swapped (``flip_text: swap``). Parameters come from a generator seeded by (seed, epoch, sample),
so a resumed run sees the same augmentations.
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

_LEFT_RIGHT = re.compile(r"\b(left|right|Left|Right|LEFT|RIGHT)\b")
_SWAP = {"left": "right", "right": "left", "Left": "Right", "Right": "Left", "LEFT": "RIGHT", "RIGHT": "LEFT"}


@dataclass(frozen=True)
class ImageAug:
    """Per-image parameters; the crop is relative (area fraction, log aspect ratio, centre x/y in [0, 1])."""

    crop: tuple[float, float, float, float] | None = None
    flip: bool = False
    brightness: float = 1.0
    contrast: float = 1.0
    tiles: tuple[int, int] | None = None   # dynamic resolution: (cols, rows) of tiles (data/tiles.py)
    thumbnail: bool = False                # with tiles: a thumbnail of the whole image after them
    # raw patch inputs (data/patches.py): the (width, height) the box is scaled to, and the patch size
    native_size: tuple[int, int] | None = None
    patch_size: int | None = None

    def box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """Source box (x0, y0, x1, y1) in pixels; without a crop, the centre square (CLIP's crop),
        or the whole image when it is tiled or kept at its own resolution."""
        if self.crop is None and (self.tiles is not None or self.native_size is not None):
            return 0.0, 0.0, float(width), float(height)
        if self.crop is None:
            side = min(width, height)
            x0, y0 = (width - side) / 2, (height - side) / 2
            return x0, y0, x0 + side, y0 + side
        area, log_ratio, cx, cy = self.crop
        ratio = math.exp(log_ratio)
        side_area = area * min(width, height) ** 2   # crop area relative to the centre square
        w = min(width, math.sqrt(side_area * ratio))
        h = min(height, math.sqrt(side_area / ratio))
        x0 = cx * (width - w)
        y0 = cy * (height - h)
        return x0, y0, x0 + w, y0 + h


def mentions_left_right(text: str) -> bool:
    return bool(_LEFT_RIGHT.search(text))


def swap_left_right(text: str) -> str:
    return _LEFT_RIGHT.sub(lambda m: _SWAP[m.group(0)], text)


def sample_aug(cfg, rng: random.Random) -> ImageAug:
    lo, hi = cfg.crop_scale
    crop = (rng.uniform(lo, hi), rng.uniform(math.log(3 / 4), math.log(4 / 3)), rng.random(), rng.random())
    j = cfg.jitter
    return ImageAug(crop=crop, flip=rng.random() < cfg.flip_prob,
                    brightness=rng.uniform(1 - j, 1 + j), contrast=rng.uniform(1 - j, 1 + j))


def augment_record(record, cfg, seed: int, epoch: int, index: int):
    """(per-image ImageAug list, text transform) for one record; no-op when disabled."""
    if cfg is None or not cfg.enabled:
        return [ImageAug() for _ in record.images], None
    rng = random.Random((seed * 1_000_003 + epoch) * 10_000_019 + index)
    augs = [sample_aug(cfg, rng) for _ in record.images]
    if not any(a.flip for a in augs):
        return augs, None
    texts = [t for pair in (record.turns or []) for t in pair] + [s for k, s in (record.segments or []) if k == "text"]
    if any(mentions_left_right(t) for t in texts):
        if cfg.flip_text == "skip":
            return [ImageAug(a.crop, False, a.brightness, a.contrast) for a in augs], None
        return augs, swap_left_right
    return augs, None
