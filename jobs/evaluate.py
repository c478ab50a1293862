"""COCO mAP of a training checkpoint on a val shard set.

python -m jobs.evaluate --checkpoint runs/ray/demo/checkpoint_... --data data/synthetic
"""

from __future__ import annotations

import argparse
import json

from jobs.cli import run
from pipeline.validate import evaluate_checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory or checkpoint.pt")
    parser.add_argument("--data", required=True, help="shard root with val-manifest.json and val-coco.json")
    parser.add_argument("--imgsz", type=int, default=None, help="default: the training image size")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader processes")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    scores = evaluate_checkpoint(
        args.checkpoint, args.data, args.imgsz, args.batch_size, args.workers, args.device
    )
    print(json.dumps(scores))


if __name__ == "__main__":
    run(main)
