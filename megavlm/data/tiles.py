"""Dynamic resolution (InternVL): an image becomes a grid of ``size`` x ``size`` tiles whose
aspect ratio is closest to the image's (1..max_tiles tiles), plus a thumbnail of the whole image
when there is more than one tile. Each tile is one ViT input; the sample's ``<image>`` stands for
all of them, so samples carry different numbers of image tokens (and pack like any other)."""
from __future__ import annotations

from dataclasses import replace

from PIL import Image


def candidate_grids(max_tiles: int, min_tiles: int = 1) -> list[tuple[int, int]]:
    """(cols, rows) with min..max tiles, fewest tiles first."""
    grids = {(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1) if min_tiles <= c * r <= max_tiles}
    return sorted(grids, key=lambda g: (g[0] * g[1], g[0]))


def plan_tiles(width: int, height: int, size: int, max_tiles: int, min_tiles: int = 1) -> tuple[int, int]:
    """InternVL's choice: the grid whose aspect ratio is closest to width/height; among equally
    close grids, a larger one only while the image has more than half the grid's pixels (so a
    small image is not blown up into many tiles)."""
    if max_tiles < min_tiles or min_tiles < 1:
        raise ValueError(f"tile counts must satisfy 1 <= min_tiles ({min_tiles}) <= max_tiles ({max_tiles})")
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(max_tiles, min_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * size * size * cols * rows:
            best = (cols, rows)
    return best


def num_views(grid: tuple[int, int], thumbnail: bool) -> int:
    """ViT inputs of an image tiled as ``grid``: its tiles, plus the thumbnail when there are several."""
    tiles = grid[0] * grid[1]
    return tiles + (1 if thumbnail and tiles > 1 else 0)


def split_tiles(image: Image.Image, size: int, grid: tuple[int, int], thumbnail: bool, box=None) -> list[Image.Image]:
    """Resize (bicubic) the ``box`` of ``image`` to the grid, cut it row by row, then the thumbnail."""
    cols, rows = grid
    whole = image.resize((cols * size, rows * size), Image.BICUBIC, box=box)
    tiles = [whole.crop((c * size, r * size, (c + 1) * size, (r + 1) * size)) for r in range(rows) for c in range(cols)]
    if thumbnail and len(tiles) > 1:
        tiles.append(image.resize((size, size), Image.BICUBIC, box=box))
    return tiles


class TilePlanner:
    """Puts each image's grid into its augmentation parameters (read from the image header, no
    decode) and reports how many ViT inputs each image becomes."""

    def __init__(self, size: int, max_tiles: int, thumbnail: bool = True, min_tiles: int = 1):
        self.size, self.max_tiles, self.thumbnail, self.min_tiles = size, max_tiles, thumbnail, min_tiles
        plan_tiles(1, 1, size, max_tiles, min_tiles)  # validate the counts once

    def plan(self, data: bytes, aug, sample_id: str, source: str):
        """(aug with the tile grid, number of views)."""
        from megavlm.data.images import image_size

        width, height = image_size(data, sample_id, source)
        if aug.crop is not None:
            x0, y0, x1, y1 = aug.box(width, height)
            width, height = max(1, round(x1 - x0)), max(1, round(y1 - y0))
        grid = plan_tiles(width, height, self.size, self.max_tiles, self.min_tiles)
        return replace(aug, tiles=grid, thumbnail=self.thumbnail), num_views(grid, self.thumbnail)
