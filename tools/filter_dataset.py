#!/usr/bin/env python
"""Filter an image-text dataset by CLIP similarity and remove duplicates; the input is never changed.

    python tools/filter_dataset.py --input data/embedded/captions_train.jsonl --format captions \\
        --clip outputs/clip/debug --out outputs/filtered --min-similarity 0.28
    torchrun --nproc_per_node 8 tools/filter_dataset.py ...      # records sharded over the ranks

--clip is a megavlm CLIP/SigLIP checkpoint (a contrastive stage's, or one converted from HF) or an
HF CLIPModel / SiglipModel directory; without it only the duplicate filters run. Each record's
CLIP similarity is the cosine of its image and text embeddings (its worst image-text pair).
--min-similarity drops records below it; leave it out to score only, then choose a threshold from
<out>/similarity_histogram.png and summary.txt and rerun (the scores are kept: a rerun only decides).

Duplicates, among the records that pass, the first of each group kept: exact (the same decoded
pixels and normalised text), near-duplicate images (colour pHash within --phash-radius bits of 768;
colour-thumbnail cosine >= --thumbnail-threshold, which also finds slight crops; CLIP-embedding cosine
>= --embedding-threshold, off unless given: it also groups distinct photos of the same content) and
near-duplicate captions (5-gram Jaccard >= --caption-threshold; groups past --max-caption-repeats
records are cut, otherwise only reported).

Output in --out: the kept records in the input's format (image paths rewritten relative to --out;
shards: new shards under shards/), dropped.jsonl (every dropped record with its reason, score and
the record it duplicates), scores.jsonl, summary.txt / summary.json (counts by reason, score
quantiles) and similarity_histogram.png. A killed run continues when the same command is rerun.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")


def parse_args(argv=None):
    from megavlm.data.quality.pipeline import FilterSettings

    d = FilterSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="the dataset file (a shard index.json for --format shards)")
    parser.add_argument("--format", required=True, choices=["captions", "conversations", "interleaved", "shards"])
    parser.add_argument("--root", default=None, help="image folder (default: the input file's folder)")
    parser.add_argument("--out", required=True, help="output directory (created; never the input's file)")
    parser.add_argument("--clip", default=None, help="megavlm or HF CLIP/SigLIP checkpoint that scores the pairs")
    parser.add_argument("--tokenizer", default=None, help="the CLIP model's tokenizer (default: beside the checkpoint)")
    parser.add_argument("--min-similarity", type=float, default=None, help="drop records below this CLIP similarity")
    parser.add_argument("--no-dedup", action="store_true", help="no duplicate filters")
    parser.add_argument("--phash-radius", type=float, default=d.phash_radius,
                        help=f"colour pHash Hamming radius in bits of 768 (default {d.phash_radius}; -1: off)")
    parser.add_argument("--thumbnail-threshold", type=float, default=d.thumbnail_threshold,
                        help=f"colour-thumbnail cosine of near-duplicates (default {d.thumbnail_threshold}; -1: off)")
    parser.add_argument("--embedding-threshold", type=float, default=None,
                        help="CLIP image-embedding cosine of near-duplicates (default: off)")
    parser.add_argument("--caption-threshold", type=float, default=d.caption_threshold,
                        help=f"5-gram Jaccard similarity of near-duplicate captions (default {d.caption_threshold})")
    parser.add_argument("--max-caption-repeats", type=int, default=None,
                        help="keep at most this many records per near-duplicate caption group (default: report only)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="records per batch (and per saved part)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="the CLIP model's dtype")
    parser.add_argument("--restart", action="store_true", help="discard the measurements of an earlier run")
    return parser.parse_args(argv)


def settings_from(args):
    from megavlm.data.quality.pipeline import FilterSettings

    def off(value):
        return None if value is None or value < 0 else value

    return FilterSettings(min_similarity=args.min_similarity, dedup=not args.no_dedup,
                          phash_radius=off(args.phash_radius), thumbnail_threshold=off(args.thumbnail_threshold),
                          embedding_threshold=off(args.embedding_threshold), caption_threshold=args.caption_threshold,
                          max_caption_repeats=args.max_caption_repeats, batch_size=args.batch_size)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import torch.distributed as dist

    from megavlm.config.model import ParallelConfig
    from megavlm.data.quality.pipeline import FilterError, run_filter
    from megavlm.eval.clip_score import ClipScorer
    from megavlm.parallel import init as pinit

    if args.min_similarity is not None and not args.clip:
        print("error: --min-similarity needs --clip (a model to score the pairs)", file=sys.stderr)
        return 2
    ctx = pinit.initialize(ParallelConfig(), seed=0)   # every rank a whole model: the records are what is split
    try:
        scorer = None
        if args.clip:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
            scorer = ClipScorer.load(args.clip, pinit.process_groups(), ctx.device, args.tokenizer, dtype)
        start = time.perf_counter()

        def progress(batch: int, batches: int) -> None:
            if ctx.is_main:
                print(f"\rmeasured batch {batch + 1}/{batches} ({time.perf_counter() - start:.0f} s)", end="",
                      flush=True)

        summary = run_filter(args.input, args.format, args.out, scorer, args.clip, settings_from(args), args.root,
                             ctx.rank, ctx.world_size, dist.barrier, args.restart, progress=progress)
    except (FilterError, FileNotFoundError, ValueError) as err:
        print(f"\nerror: {err}", file=sys.stderr)
        return 2
    finally:
        pinit.destroy()
    if summary is not None:
        print()
        print((Path(args.out) / "summary.txt").read_text(), end="")
        print(f"filtered dataset: {summary['output']}; dropped records: {Path(args.out) / 'dropped.jsonl'}"
              + (f"; histogram: {summary['histogram']}" if "histogram" in summary else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
