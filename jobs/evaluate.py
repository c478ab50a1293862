"""COCO evaluation of a training checkpoint on a val shard set: the 12 COCO numbers, AP per class and the
confusion counts as a table; --json writes them as JSON, --save-json the detections in the COCO results
format (scored against the original annotations by any COCO tool).

python -m jobs.evaluate --checkpoint runs/ray/demo/checkpoint_... --data data/synthetic
python -m jobs.evaluate --checkpoint CKPT --data /mnt/shared/coco --save-json dets.json --json report.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jobs.cli import run
from pipeline.evaluation.coco import results_json
from pipeline.evaluation.evaluate import checkpoint_evaluation
from pipeline.evaluation.table import format_table, report_dict


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
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    parser.add_argument(
        "--save-json", type=Path, default=None, help="write the detections to this COCO results file"
    )
    args = parser.parse_args(argv)
    evaluation = checkpoint_evaluation(
        args.checkpoint, args.data, args.imgsz, args.batch_size, args.workers, args.device
    )
    print(format_table(evaluation))
    if args.json is not None:
        args.json.write_text(json.dumps(report_dict(evaluation), indent=1))
    if args.save_json is not None:
        args.save_json.write_text(json.dumps(results_json(evaluation.detections)))


if __name__ == "__main__":
    run(main)
