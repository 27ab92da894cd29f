"""What the filter measures per record, batch by batch (the expensive, sharded part):

* content hashes: SHA-1 of each image's decoded RGB pixels (a re-saved file with the same pixels
  is the same image) and of the normalised text (Unicode NFKC, case-folded, punctuation removed,
  whitespace collapsed);
* a colour perceptual hash per image: imagehash's pHash of each RGB channel (``hash_size`` bits
  squared each); pHash of the grey image alone cannot tell a red shape from a green one of the same
  brightness;
* a colour thumbnail per image: 24x24 RGB, mean removed, unit length; its cosine with another's is
  a perceptual similarity that, unlike a hash, survives slight crops and shifts (a 2% crop of an
  embedded scene keeps a cosine above 0.976, while distinct scenes stay below 0.954);
* with a CLIP scorer: each image's CLIP embedding and each image-text pair's CLIP similarity (the
  record's score is its worst pair).
"""
from __future__ import annotations

import hashlib
import re
import unicodedata

import numpy as np
import torch
from PIL import Image

from megavlm.data.images import open_image
from megavlm.data.quality.dataset import Item
from megavlm.data.templates import BadSample

THUMBNAIL = 24
_SPACES = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)
    return _SPACES.sub(" ", text).strip()


def text_hash(text: str) -> str:
    return hashlib.sha1(normalize_text(text).encode()).hexdigest()


def pixel_hash(image: Image.Image) -> str:
    digest = hashlib.sha1(f"{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def colour_phash(image: Image.Image, hash_size: int) -> np.ndarray:
    """pHash bits of the R, G and B channels, packed: [3 * hash_size**2 / 8] uint8."""
    import imagehash

    bits = np.concatenate([imagehash.phash(channel, hash_size=hash_size).hash.ravel() for channel in image.split()])
    return np.packbits(bits)


def thumbnail(image: Image.Image) -> np.ndarray:
    small = np.asarray(image.resize((THUMBNAIL, THUMBNAIL), Image.BILINEAR), dtype=np.float32).ravel()
    small = small - small.mean()
    return small / max(float(np.linalg.norm(small)), 1e-6)


def measure_batch(items: list[Item], scorer, hash_size: int) -> dict:
    """Signals of a batch of records (see the module docstring), ready to be saved. Records whose
    images cannot be decoded get that error and no signals."""
    out = {"index": [], "sample_id": [], "error": [], "text_hash": [], "text": [], "similarity": [],
           "image_record": [], "pixel_hash": [], "phash": [], "thumbnail": [], "pair_similarity": []}
    decoded = []
    for item in items:
        images = []
        if item.error is None:
            try:
                images = [open_image(data, item.sample_id, f"image {k}") for k, data in enumerate(item.images)]
            except BadSample as err:
                item.error = (err.reason, str(err))
        decoded.append(images)
    pixels, texts, owners = _clip_inputs(items, scorer)
    similarity = _pair_similarity(scorer, pixels, texts)
    embeddings = scorer.image_embeddings(torch.stack(pixels)) if scorer is not None and pixels else None
    for item, images in zip(items, decoded):
        out["index"].append(item.index)
        out["sample_id"].append(item.sample_id)
        out["error"].append(item.error)
        out["text_hash"].append(text_hash(item.text))
        out["text"].append(normalize_text(item.text))
        for image in images if item.error is None else []:
            out["image_record"].append(item.index)
            out["pixel_hash"].append(pixel_hash(image))
            out["phash"].append(colour_phash(image, hash_size))
            out["thumbnail"].append(thumbnail(image))
        scores = [s for s, owner in zip(similarity, owners) if owner == item.index]
        out["pair_similarity"].append(scores)
        out["similarity"].append(min(scores) if scores and item.error is None else None)
    out["phash"] = np.stack(out["phash"]) if out["phash"] else np.zeros((0, 3 * hash_size**2 // 8), np.uint8)
    out["thumbnail"] = (np.stack(out["thumbnail"]) if out["thumbnail"]
                        else np.zeros((0, 3 * THUMBNAIL**2), np.float32)).astype(np.float16)
    if embeddings is not None:
        out["embedding"] = embeddings.half().numpy()
    return out


def _clip_inputs(items: list[Item], scorer):
    """CLIP-preprocessed images of the usable records, each image's paired text and record index;
    a record with an image CLIP's preprocessing rejects gets that error."""
    pixels, texts, owners = [], [], []
    if scorer is None:
        return pixels, texts, owners
    for item in items:
        if item.error is not None or not item.images:
            continue
        decoded = scorer.decode_images(item.images, [item.sample_id] * len(item.images))
        bad = next((d for d in decoded if isinstance(d, BadSample)), None)
        if bad is not None:
            item.error = (bad.reason, str(bad))
            continue
        pixels += decoded
        texts += item.pair_texts
        owners += [item.index] * len(decoded)
    return pixels, texts, owners


def _pair_similarity(scorer, pixels: list, texts: list[str]) -> list[float]:
    if scorer is None or not pixels:
        return []
    return scorer.similarity(torch.stack(pixels), texts).tolist()
