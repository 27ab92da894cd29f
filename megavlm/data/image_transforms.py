"""Image preprocessing: the PIL reference path (CLIP: bicubic resize of the short side, centre
crop, mean/std normalisation). Any mode (grayscale, RGBA, CMYK, palette) is converted to RGB."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGBA/LA/palette-with-transparency are composited on white; everything else converted."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    return image.resize(new, Image.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def normalize(image: Image.Image, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """HWC uint8 -> CHW float32 normalised."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def clip_preprocess(image: Image.Image, size: int) -> torch.Tensor:
    return normalize(center_crop(resize_short_side(to_rgb(image), size), size))


def blank_image(size: int, value: int = 128) -> torch.Tensor:
    """A uniform gray image through the same normalisation: the 'no information' baseline."""
    return normalize(Image.new("RGB", (size, size), (value, value, value)))
