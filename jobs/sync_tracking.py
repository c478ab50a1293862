"""Send a run's tracking records that MLflow did not take while the run went on.

A training run whose MLflow server stayed away until the end writes what it could not send (epoch
metrics, pictures, tags, the run's final status) to ``unsent-tracking.jsonl`` beside its checkpoints and
says where. Once the server is back:

python -m jobs.sync_tracking runs/ray/my-run/unsent-tracking.jsonl
python -m jobs.sync_tracking FILE --tracking-uri http://mlflow.example:5000   # the server moved

The file keeps only what still could not be sent (exit code 1), or is removed once everything is in.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jobs.cli import run
from pipeline.tracking import replay_unsent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("file", type=Path, help="an unsent-tracking.jsonl file a run wrote")
    parser.add_argument("--tracking-uri", help="send there instead of the URI each record names")
    parser.add_argument("--patience", type=float, default=60.0, help="seconds to wait for the server (60)")
    args = parser.parse_args(argv)
    left = replay_unsent(args.file, args.tracking_uri, args.patience)
    print(f"{args.file}: {left} records left to send" if left else f"sent everything in {args.file}")
    return 1 if left else 0


if __name__ == "__main__":
    run(main)
