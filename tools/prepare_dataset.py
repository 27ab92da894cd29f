#!/usr/bin/env python
"""Turn JSON/JSONL + image folders into webdataset tar shards with a random-access index.

    python tools/prepare_dataset.py --input data/embedded/conversations_train.json \
        --format conversations --out data/shards/conv_train [--root DIR] [--samples-per-shard 1000]

Records whose images are missing or empty, and malformed lines, are left out and counted. Train
on the result with ``data.format: shards`` and ``data.train: <out>/index.json``.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from megavlm.data.shards import write_shards

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="captions/interleaved JSONL or conversations JSON")
    parser.add_argument("--format", required=True, choices=["captions", "conversations", "interleaved"])
    parser.add_argument("--out", required=True, help="output folder for shard-*.tar and index.json")
    parser.add_argument("--root", default=None, help="folder image paths are relative to (default: the input's)")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    args = parser.parse_args(argv)
    report = write_shards(args.input, args.format, args.out, args.root, args.samples_per_shard)
    print(f"{'shards':<10} {len(report.shards)}")
    print(f"{'samples':<10} {report.samples}")
    print(f"{'images':<10} {report.images}")
    print(f"{'MB':<10} {report.bytes / 1e6:.1f}")
    for reason, count in sorted(report.skipped.items()):
        print(f"{'skipped':<10} {count} {reason} (e.g. {report.examples[reason]})")
    print(f"index: {args.out}/index.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
