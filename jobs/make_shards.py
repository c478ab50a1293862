"""Write WebDataset shards (+ manifest, + val-coco.json for val) from COCO, YOLO, VOC or the synthetic set.

    python -m jobs.make_shards --format coco --source images/val2017 \
        --annotations annotations/instances_val2017.json --out shards/coco --split val --max-side 640
    python -m jobs.make_shards --format yolo --data-yaml datasets/x/data.yaml --split val --out shards/x
    python -m jobs.make_shards --format yolo --source datasets/x/train --data-yaml x.yaml --out shards/x
    python -m jobs.make_shards --format voc --source VOC2012 --out shards/voc --workers 8
    python -m jobs.make_shards --format synthetic --out shards/synthetic --split val --num 64 --seed 1
    python -m jobs.make_shards --format synthetic --out s3://my-bucket/shards/synthetic --split train

Object storage: credentials and endpoint from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_REGION, AWS_ENDPOINT_URL for an S3-compatible store), never from a file of this project.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jobs.cli import run
from pipeline.data.make import FORMATS, make_shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument(
        "--source", type=Path, help="image dir (coco), dataset root (voc), images/ + labels/ root (yolo)"
    )
    parser.add_argument(
        "--out", required=True, help="shard directory: a local folder or a URL (s3://bucket/prefix, gs://...)"
    )
    parser.add_argument(
        "--split",
        default="train",
        help="split name (default train); yolo without --source reads it from --data-yaml",
    )
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per tar (default 1000)")
    parser.add_argument("--max-side", type=int, help="downscale images whose longest side exceeds this (px)")
    parser.add_argument("--workers", type=int, default=1, help="image encoding processes (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace this split's existing shards")
    parser.add_argument("--annotations", type=Path, help="COCO instances JSON (coco)")
    parser.add_argument(
        "--data-yaml", type=Path, help="data YAML (yolo): names, and path + splits unless --source is given"
    )
    parser.add_argument("--num", type=int, default=512, help="images (synthetic, default 512)")
    parser.add_argument(
        "--image-size", type=int, default=256, help="image side in px (synthetic, default 256)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed (synthetic, default 0)")
    args = parser.parse_args(argv)
    manifest = make_shards(
        args.format,
        args.out,
        args.split,
        source=args.source,
        shard_size=args.shard_size,
        max_side=args.max_side,
        workers=args.workers,
        overwrite=args.overwrite,
        annotations=args.annotations,
        data_yaml=args.data_yaml,
        num=args.num,
        image_size=args.image_size,
        seed=args.seed,
    )
    print(
        f"{manifest.num_samples} samples, {manifest.num_boxes} boxes, {len(manifest.shards)} shards -> "
        f"{manifest.path} (content hash {manifest.manifest_hash[:16]})"
    )
    return 0


if __name__ == "__main__":
    run(main)
