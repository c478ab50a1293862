"""Search the PGI loss weights and the TAL top-k (or any config keys) with Ray Tune.

    python -m jobs.tune --config jobs/configs/tune-demo.yaml
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m jobs.tune --config jobs/configs/tune-coco-yolov9-c.yaml
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jobs.cli import run
from pipeline.config import load_config
from pipeline.search.trials import ranking_table
from pipeline.search.tune import run_search

DEMO_CONFIG = Path(__file__).parent / "configs" / "tune-demo.yaml"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", type=Path, default=DEMO_CONFIG, help="experiment YAML with a tune section"
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_intermixed_args(argv)  # options after overrides too
    cfg = load_config(args.config, args.overrides)
    rows = run_search(cfg)
    print(ranking_table(rows, cfg.tune.mode))
    print(
        f"\n{sum(r.status == 'completed' for r in rows)} completed, "
        f"{sum(r.status == 'stopped early' for r in rows)} stopped early, "
        f"{sum(r.status == 'errored' for r in rows)} errored"
    )


if __name__ == "__main__":
    run(main)
