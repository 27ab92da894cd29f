"""Raw patch inputs (Fuyu): an image keeps its own resolution and becomes a grid of patches.

The image is scaled down (aspect ratio kept, never up) to fit ``max_width`` x ``max_height``,
padded at the bottom and right to a multiple of the patch size, and cut into patches in raster
order; a patch is flattened as (row, column, channel) pixels, HF Fuyu's order. In the token
sequence each row of patches is followed by the image-newline token, so the decoder sees the
grid's shape: an image of ``rows`` x ``cols`` patches fills ``rows * (cols + 1)`` positions, and
reaches the model as ``rows * cols`` inputs of ``3 * patch_size**2`` values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

# The padding pixel value (0..255), as HF's Fuyu processor pads (1.0 before rescaling): black.
PAD_VALUE = 1


@dataclass(frozen=True)
class PatchGrid:
    """The layout of one image: its size after scaling (before padding) and the patch size."""

    width: int
    height: int
    patch_size: int

    @property
    def cols(self) -> int:
        return math.ceil(self.width / self.patch_size)

    @property
    def rows(self) -> int:
        return math.ceil(self.height / self.patch_size)

    @property
    def patches(self) -> int:
        return self.rows * self.cols

    @property
    def positions(self) -> int:
        """Decoder positions: every patch and one newline per row."""
        return self.rows * (self.cols + 1)


def fit(width: int, height: int, max_width: int, max_height: int) -> tuple[int, int]:
    """(width, height) scaled down to fit the maximum, aspect ratio kept (HF Fuyu's rule, which
    truncates); an image that fits is left as it is."""
    if width <= max_width and height <= max_height:
        return width, height
    scale = min(max_height / height, max_width / width)
    return max(1, int(width * scale)), max(1, int(height * scale))


def plan_grid(width: int, height: int, patches_cfg) -> PatchGrid:
    """The grid of an image of ``width`` x ``height`` pixels under a ``PatchInputConfig``."""
    w, h = fit(width, height, patches_cfg.max_width, patches_cfg.max_height)
    return PatchGrid(w, h, patches_cfg.patch_size)


def grid_token_ids(grid: PatchGrid, image_token_id: int, newline_token_id: int) -> list[int]:
    """Placeholder ids of one image, row by row: ``cols`` image positions, then the newline."""
    return ([image_token_id] * grid.cols + [newline_token_id]) * grid.rows


def pad_to_grid(pixels: torch.Tensor, patch_size: int, value: float) -> torch.Tensor:
    """[3, H, W] padded at the bottom and right with ``value`` to multiples of ``patch_size``."""
    _, h, w = pixels.shape
    pad_h, pad_w = -h % patch_size, -w % patch_size
    if not pad_h and not pad_w:
        return pixels
    return torch.nn.functional.pad(pixels, (0, pad_w, 0, pad_h), value=value)


def patchify(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[3, H, W] (H, W multiples of ``patch_size``) -> [rows * cols, patch_size^2 * 3], raster
    order, each patch's pixels in (row, column, channel) order."""
    c, h, w = pixels.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"an image of {w}x{h} pixels does not split into {patch_size}-pixel patches: pad it first")
    grid = pixels.reshape(c, h // patch_size, patch_size, w // patch_size, patch_size)
    return grid.permute(1, 3, 2, 4, 0).reshape(-1, patch_size * patch_size * c)


class PatchGridPlanner:
    """Puts each image's scaled size into its augmentation parameters (read from the image
    header, no decode) and reports its grid: how many positions and inputs the image becomes."""

    def __init__(self, patches_cfg):
        self.cfg = patches_cfg

    def plan(self, data: bytes, aug, sample_id: str, source: str):
        """(aug with the scaled size and patch size, the image's PatchGrid)."""
        from megavlm.data.images import image_size

        width, height = image_size(data, sample_id, source)
        if aug.crop is not None:
            x0, y0, x1, y1 = aug.box(width, height)
            width, height = max(1, round(x1 - x0)), max(1, round(y1 - y0))
        grid = plan_grid(width, height, self.cfg)
        return replace(aug, native_size=(grid.width, grid.height), patch_size=grid.patch_size), grid
