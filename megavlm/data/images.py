"""Image decoding and preprocessing: the PIL reference and the DALI pipeline (CPU here, nvJPEG
on GPUs), with the same geometry: a source box (CLIP's centre square, or a random crop) resized
bicubically to size x size, optional flip and brightness/contrast, then CLIP mean/std.

Agreement, DALI vs PIL on the embedded JPEGs (normalised units, CPU pipeline): mean |Δ| 0.0005,
max |Δ| 0.13 at 336 px (decoders' IDCT and the two bicubic resamplers differ slightly). The test
tolerance is mean < 0.005, max < 0.25 (tests/test_data_pipeline.py). Without augmentation the PIL
path equals ``clip_reference`` (resize the short side, centre crop) exactly on square images.
"""
from __future__ import annotations

import io
import logging

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from megavlm.data.augment import ImageAug
from megavlm.data.patches import PAD_VALUE, pad_to_grid, patchify
from megavlm.data.templates import BadSample
from megavlm.data.tiles import split_tiles

log = logging.getLogger(__name__)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MIN_SIDE, MAX_ASPECT = 2, 20.0


def to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale, CMYK and palette become RGB; transparency is composited on white."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image if image.mode == "RGB" else image.convert("RGB")


def open_image(data: bytes, sample_id: str, source: str) -> Image.Image:
    """Decoded RGB image; corrupt, truncated, tiny or extreme-aspect images raise BadSample."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BadSample("corrupt_image", f"sample {sample_id}: cannot decode image {source}: {err}") from None
    check_shape(image.size, sample_id, source)
    return to_rgb(image)


def check_shape(size: tuple[int, int], sample_id: str, source: str) -> None:
    w, h = size
    if min(w, h) < MIN_SIDE or max(w, h) / min(w, h) > MAX_ASPECT:
        raise BadSample("bad_image_shape", f"sample {sample_id}: image {source} is {w}x{h} "
                                           f"(need sides >= {MIN_SIDE} and aspect <= {MAX_ASPECT:g})")


def image_size(data: bytes, sample_id: str, source: str) -> tuple[int, int]:
    """Width and height from the header only (no decode)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BadSample("corrupt_image", f"sample {sample_id}: cannot read image {source}: {err}") from None
    check_shape(size, sample_id, source)
    return size


def jitter(array: np.ndarray, brightness: float, contrast: float) -> np.ndarray:
    """DALI's brightness_contrast on uint8: b * (128 + c * (x - 128)), rounded and clamped."""
    if brightness == 1.0 and contrast == 1.0:
        return array
    out = brightness * (128.0 + contrast * (array.astype(np.float32) - 128.0))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _scaled(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32) * 255


def normalize(array: np.ndarray, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """HWC uint8 -> CHW float32 with the per-channel mean/std (CLIP's by default)."""
    out = (array.astype(np.float32) - _scaled(mean)) / _scaled(std)
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))


def _patches(image: Image.Image, box, aug: ImageAug, mean, std) -> torch.Tensor:
    """Raw patch inputs: the box scaled (bilinear, as HF Fuyu's processor) to ``aug.native_size``,
    padded to whole patches, [patches, 3 * patch_size^2]."""
    image = image.resize(aug.native_size, Image.BILINEAR, box=box)
    if aug.flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.array(jitter(np.asarray(image), aug.brightness, aug.contrast)))
    padded = pad_to_grid(pixels.permute(2, 0, 1), aug.patch_size, PAD_VALUE)
    return patchify(normalize(padded.permute(1, 2, 0).numpy(), mean, std), aug.patch_size)


def pil_preprocess(data: bytes, size: int | None, aug: ImageAug, sample_id: str = "?", source: str = "?",
                   mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """[3, size, size], [views, 3, size, size] for a tiled image (``aug.tiles``), or
    [patches, 3 * p * p] for raw patch inputs (``aug.patch_size``, data/patches.py)."""
    image = open_image(data, sample_id, source)
    box = aug.box(*image.size)
    if aug.patch_size is not None:
        return _patches(image, box, aug, mean, std)
    if aug.tiles is not None:
        if aug.flip:  # mirror the whole image (and its box) before it is cut into tiles
            image, box = image.transpose(Image.FLIP_LEFT_RIGHT), (image.width - box[2], box[1], image.width - box[0], box[3])
        views = split_tiles(image, size, aug.tiles, aug.thumbnail, box)
        return torch.stack([normalize(jitter(np.asarray(v), aug.brightness, aug.contrast), mean, std) for v in views])
    image = image.resize((size, size), Image.BICUBIC, box=box)
    if aug.flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return normalize(jitter(np.asarray(image), aug.brightness, aug.contrast), mean, std)


def clip_reference(image: Image.Image, size: int) -> torch.Tensor:
    """CLIP preprocessing as specified: bicubic resize of the short side, centre crop, mean/std."""
    image = to_rgb(image)
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return normalize(np.asarray(image.crop((left, top, left + size, top + size))))


def blank_like(inputs: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD, value: int = 128) -> torch.Tensor:
    """Uniform gray in the shape of image inputs: ViT inputs [..., 3, H, W] (one image or a batch),
    or raw patches [n, 3 * p * p] (channel-last pixels), so a blank image keeps the layout it replaces."""
    gray = normalize(np.full((1, 1, 3), value, dtype=np.uint8), mean, std).reshape(3).to(inputs.device, inputs.dtype)
    if inputs.dim() == 2:
        return gray.repeat(inputs.shape[1] // 3).expand(inputs.shape[0], -1).contiguous()
    return gray.view(*[1] * (inputs.dim() - 3), 3, 1, 1).expand_as(inputs).contiguous()


class PILBackend:
    name = "pil"

    def __init__(self, size: int | None, mean=CLIP_MEAN, std=CLIP_STD):
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)

    def decode(self, items: list[tuple[bytes, ImageAug, str, str]]) -> list[torch.Tensor | BadSample]:
        out = []
        for data, aug, sample_id, source in items:
            try:
                out.append(pil_preprocess(data, self.size, aug, sample_id, source, self.mean, self.std))
            except BadSample as err:
                out.append(err)
        return out


class DALIBackend:
    """One DALI pipeline fed encoded bytes and per-image parameters through external_source.

    ``device="gpu"`` decodes with nvJPEG (DALI's "mixed" decoder) on GPU ``device_id`` — the
    local rank's own device, so ranks never share one GPU's decoder — and returns CUDA tensors.
    A batch DALI cannot decode falls back to PIL image by image, so a corrupt file is skipped
    and counted like on the PIL path. Tiled images (dynamic resolution) are cut into tiles, and
    raw patch inputs at their own sizes cut into patches, on the PIL path too; ``fallbacks``
    counts each kind, and the first of each is logged.
    """

    name = "dali"

    def __init__(self, size: int | None, device: str = "cpu", num_threads: int = 2, max_batch: int = 64,
                 device_id: int | None = None, mean=CLIP_MEAN, std=CLIP_STD):
        import nvidia.dali  # noqa: F401  (fail here, with the import error, when DALI is absent)

        self.size, self.device, self.num_threads, self.max_batch = size, device, num_threads, max_batch
        self.mean, self.std = tuple(mean), tuple(std)
        self.device_id = (device_id if device_id is not None else 0) if device == "gpu" else None
        self.pipe = None
        self.fallback = PILBackend(size, mean, std)
        self.fallbacks = {"tiled": 0, "patches": 0, "undecodable": 0}

    def _fall_back(self, kind: str, items: list) -> list:
        if not self.fallbacks[kind]:
            why = {"tiled": "tiled images are cut into tiles with PIL",
                   "patches": "images at their own resolution are cut into patches with PIL"}.get(
                kind, "DALI could not decode a batch")
            log.warning("image decoding: %s; counting such images as data/pil_fallback_%s", why, kind)
        self.fallbacks[kind] += len(items)
        return self.fallback.decode(items)

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        size = self.size

        @pipeline_def(batch_size=self.max_batch, num_threads=self.num_threads,
                      device_id=self.device_id, prefetch_queue_depth=1)
        def clip_pipeline():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8)
            box_start = fn.external_source(name="box_start", dtype=types.FLOAT)
            box_end = fn.external_source(name="box_end", dtype=types.FLOAT)
            mirror = fn.external_source(name="mirror", dtype=types.INT32)
            brightness = fn.external_source(name="brightness", dtype=types.FLOAT)
            contrast = fn.external_source(name="contrast", dtype=types.FLOAT)
            images = fn.decoders.image(encoded, device="mixed" if self.device == "gpu" else "cpu",
                                       output_type=types.RGB)
            images = fn.resize(images, size=[size, size], roi_start=box_start, roi_end=box_end, roi_relative=False,
                               interp_type=types.INTERP_CUBIC, antialias=True)
            images = fn.brightness_contrast(images, brightness=brightness, contrast=contrast, contrast_center=128.0)
            return fn.crop_mirror_normalize(images, mirror=mirror, mean=list(_scaled(self.mean)),
                                            std=list(_scaled(self.std)),
                                            output_layout="CHW", dtype=types.FLOAT)

        self.pipe = clip_pipeline()
        self.pipe.build()

    def _run(self, datas, augs, sizes) -> list[torch.Tensor]:
        boxes = [aug.box(*wh) for aug, wh in zip(augs, sizes)]
        feed = {
            "encoded": [np.frombuffer(d, dtype=np.uint8) for d in datas],
            # DALI's ROI is (y, x) in the HWC layout
            "box_start": [np.array([b[1], b[0]], dtype=np.float32) for b in boxes],
            "box_end": [np.array([b[3], b[2]], dtype=np.float32) for b in boxes],
            "mirror": [np.array(int(a.flip), dtype=np.int32) for a in augs],
            "brightness": [np.array(a.brightness, dtype=np.float32) for a in augs],
            "contrast": [np.array(a.contrast, dtype=np.float32) for a in augs],
        }
        for name, value in feed.items():
            self.pipe.feed_input(name, value)
        (out,) = self.pipe.run()
        if self.device == "gpu":
            return list(torch.from_dlpack(out.as_tensor()).unbind(0))
        return [torch.from_numpy(np.array(t)) for t in out]

    def decode(self, items: list[tuple[bytes, ImageAug, str, str]]) -> list[torch.Tensor | BadSample]:
        if not items:
            return []
        if len(items) > self.max_batch or self.pipe is None:
            self.max_batch = max(self.max_batch, len(items))
            self._build()
        results: list = [None] * len(items)
        good = []
        for i, (data, aug, sample_id, source) in enumerate(items):
            if aug.tiles is not None or aug.patch_size is not None:
                results[i] = self._fall_back("tiled" if aug.tiles is not None else "patches", [items[i]])[0]
                continue
            try:
                good.append((i, image_size(data, sample_id, source)))
            except BadSample as err:
                results[i] = err
        try:
            outs = self._run([items[i][0] for i, _ in good], [items[i][1] for i, _ in good], [wh for _, wh in good])
        except RuntimeError as err:  # a file DALI cannot decode: find it on the PIL path
            log.warning("DALI could not decode a batch (%s); decoding it with PIL", str(err).splitlines()[0])
            for (i, _), decoded in zip(good, self._fall_back("undecodable", [items[i] for i, _ in good])):
                results[i] = decoded
            return results
        for (i, _), tensor in zip(good, outs):
            results[i] = tensor
        return results


def make_backend(name: str, size: int | None, num_threads: int = 2, device_id: int | None = None,
                 mean=CLIP_MEAN, std=CLIP_STD):
    """'pil', 'dali' (CPU pipeline, or nvJPEG when CUDA is present), or 'auto': DALI's nvJPEG on
    GPUs when DALI is installed, PIL otherwise. ``device_id``: this rank's GPU; ``mean``/``std``:
    the model's pixel normalisation; ``size``: the ViT's input side (None: raw patch inputs)."""
    device = "gpu" if torch.cuda.is_available() else "cpu"
    if name == "dali" or (name == "auto" and device == "gpu"):
        try:
            return DALIBackend(size, device, num_threads, device_id=device_id, mean=mean, std=std)
        except ImportError:
            if name == "dali":
                raise ImportError("data.image_backend: dali needs nvidia-dali (pip install nvidia-dali-cuda130)") from None
    if name in ("pil", "auto"):
        return PILBackend(size, mean, std)
    raise ValueError(f"unknown image backend {name!r} (pil, dali, auto)")
