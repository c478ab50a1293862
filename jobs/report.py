"""The report of a search (the PGI study: jobs/configs/study-pgi.yaml) from its MLflow runs: a table per
arm with the seed spread, the mAP curves, the gradient diagnostics side by side and a conclusion that
states only what the numbers support. Written to --out and logged to the search's parent run.

    python -m jobs.tune --config jobs/configs/study-pgi.yaml
    python -m jobs.report --search study-pgi
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jobs.cli import run
from pipeline.search.study_report import build_report
from pipeline.tracking import check_tracking_uri, resolve_tracking_uri


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--search", required=True, help="the search's tune.name")
    parser.add_argument(
        "--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"
    )
    parser.add_argument("--out", type=Path, help="folder for report.md and its PNGs (default report-SEARCH)")
    parser.add_argument(
        "--target", type=float, default=0.9, help="epochs to reach this fraction of the best mAP50-95"
    )
    args = parser.parse_args(argv)
    uri = resolve_tracking_uri(args.tracking_uri)
    check_tracking_uri(uri)
    report = build_report(uri, args.search, args.out or Path(f"report-{args.search}"), args.target)
    print(report.read_text())
    print(f"written to {report.parent} and logged to the search's parent run (artifacts report/)")


if __name__ == "__main__":
    run(main)
