"""Train YOLOv9 on Ray Train.

python -m jobs.train                                   # the demo: synthetic data, local Ray
python -m jobs.train --local                           # the same in this one process, no Ray, no DDP
python -m jobs.train --config CONFIG.yaml train.epochs=3 loss.aux_weight=0.5
ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.train --config CONFIG.yaml
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jobs.cli import run
from pipeline.config import load_config
from pipeline.training.job import run_training

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", type=Path, default=DEMO_CONFIG, help="experiment YAML (default: the demo)"
    )
    parser.add_argument(
        "--local",
        action="store_true",
        help="train in this process without Ray (one worker, no DDP): for debugging and notebooks",
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_intermixed_args(argv)  # options after overrides too
    summary = run_training(load_config(args.config, args.overrides), local=args.local)
    print(
        f"\nbest mAP@0.5:0.95 {summary.best_map50_95:.4f}, mAP@0.5 {summary.best_map50:.4f} "
        f"after {summary.epochs} epochs"
    )
    print(f"best checkpoint:   {summary.best_checkpoint}")
    print(f"latest checkpoint: {summary.latest_checkpoint}")
    print(f"MLflow run:        {summary.mlflow_run_id} in {summary.mlflow_uri}")
    print(f"browse it with:    mlflow ui --backend-store-uri {summary.mlflow_uri}")


if __name__ == "__main__":
    run(main)
