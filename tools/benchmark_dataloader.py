#!/usr/bin/env python
"""Data-loading benchmark: image decode + CLIP preprocessing throughput (PIL vs DALI) for 1..N
workers, and the padding fraction with and without sequence packing.

    python tools/benchmark_dataloader.py [--images 256] [--size 336] [--workers 1,2] [--json]

Images are generated photo-sized JPEGs (640x480, textured, so decoding costs what it costs on
real photos). PIL runs N worker processes; DALI runs one pipeline with N threads (CPU here,
nvJPEG "mixed" decoding when a GPU is present). Lengths follow a LLaVA-like long tail
(100-2048 tokens: many short captions, a tail of long conversations).
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from megavlm.data.augment import ImageAug


def make_jpegs(count: int, out: Path, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        base = rng.integers(0, 255, size=(3,), dtype=np.uint8)
        noise = rng.normal(0, 40, size=(480, 640, 3))
        gradient = np.linspace(0, 80, 640)[None, :, None]
        array = np.clip(base + noise + gradient, 0, 255).astype(np.uint8)
        path = out / f"img_{i:05d}.jpg"
        Image.fromarray(array).save(path, quality=90)
        paths.append(path)
    return paths


def _pil_chunk(args):
    from megavlm.data.images import pil_preprocess

    paths, size = args
    torch.set_num_threads(1)
    for p in paths:
        pil_preprocess(Path(p).read_bytes(), size, ImageAug())
    return len(paths)


def pil_throughput(paths: list[Path], size: int, workers: int) -> float:
    chunks = [([str(p) for p in paths[i::workers]], size) for i in range(workers)]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(workers) as pool:
        pool.map(_pil_chunk, [(c[0][:4], size) for c in chunks])  # warm up the workers
        start = time.perf_counter()
        done = sum(pool.map(_pil_chunk, chunks))
        return done / (time.perf_counter() - start)


def dali_throughput(paths: list[Path], size: int, workers: int, batch: int = 32) -> float | None:
    try:
        from megavlm.data.images import DALIBackend

        device = "gpu" if torch.cuda.is_available() else "cpu"
        backend = DALIBackend(size, device, num_threads=workers, max_batch=batch)
    except ImportError:
        return None
    datas = [p.read_bytes() for p in paths]
    items = [(d, ImageAug(), "bench", "bench") for d in datas]
    backend.decode(items[:batch])  # build + warm up
    start = time.perf_counter()
    for i in range(0, len(items), batch):
        out = backend.decode(items[i:i + batch])
    if device == "gpu":
        torch.cuda.synchronize()
    assert all(torch.is_tensor(t) for t in out)
    return len(items) / (time.perf_counter() - start)


def llava_like_lengths(count: int, seed: int = 0) -> list[int]:
    """Long-tailed token counts in [100, 2048]: log-normal around ~300 tokens."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(mean=np.log(320), sigma=0.8, size=count), 100, 2048).astype(int).tolist()


def main() -> None:
    from megavlm.data.collate import padding_fraction

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=336)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--samples", type=int, default=20000, help="samples for the padding figures")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = {"decode": [], "padding": {}}
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(args.images, Path(tmp))
        for workers in (int(w) for w in args.workers.split(",")):
            pil = pil_throughput(paths, args.size, workers)
            dali = dali_throughput(paths, args.size, workers)
            results["decode"].append({"workers": workers, "pil_images_per_s": pil, "dali_images_per_s": dali,
                                      "dali_over_pil": dali / pil if dali else None})
    lengths = llava_like_lengths(args.samples)
    for seq, mbs in ((2048, 8), (4096, 4)):
        results["padding"][f"seq{seq}"] = {
            "padded": padding_fraction(lengths, seq, mbs, packed=False),
            "packed": padding_fraction(lengths, seq, mbs, packed=True)}
    if args.json:
        print(json.dumps(results, indent=2))
        return
    device = "nvJPEG (mixed)" if torch.cuda.is_available() else "CPU pipeline"
    print(f"decode + CLIP preprocessing to {args.size}px, {args.images} JPEGs 640x480; DALI: {device}")
    print(f"{'workers':>7} {'PIL img/s':>10} {'DALI img/s':>11} {'DALI/PIL':>9}")
    for r in results["decode"]:
        dali = f"{r['dali_images_per_s']:.0f}" if r["dali_images_per_s"] else "n/a"
        ratio = f"{r['dali_over_pil']:.2f}" if r["dali_over_pil"] else "n/a"
        print(f"{r['workers']:>7} {r['pil_images_per_s']:>10.0f} {dali:>11} {ratio:>9}")
    print(f"\npadding fraction, {args.samples} LLaVA-like samples (mean {np.mean(lengths):.0f} tokens)")
    print(f"{'budget':>8} {'padded':>8} {'packed':>8}")
    for name, r in results["padding"].items():
        print(f"{name:>8} {r['padded']:>8.1%} {r['packed']:>8.1%}")


if __name__ == "__main__":
    main()
