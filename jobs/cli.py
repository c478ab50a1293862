"""What every job does around its one call: log lines to the terminal (or the Ray job log), and a user's
mistake reported as one line with a non-zero exit code instead of a traceback. Also the ``yolov9-ray``
console script: ``yolov9-ray COMMAND ...`` (one of ``COMMANDS``) is ``python -m jobs.<command> ...``."""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable

from pipeline.errors import PipelineError

USER_ERROR_EXIT = 2


def run(main: Callable[[], int | None]) -> None:
    """Run a job's ``main`` and exit with its code: 0 for None, ``USER_ERROR_EXIT`` with ``error: ...`` on
    stderr for a PipelineError (a bad config, missing data, an unreachable store, a refused source)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    pipeline_log = logging.getLogger("pipeline")  # the pipeline's own lines; libraries keep their settings
    pipeline_log.addHandler(handler)
    pipeline_log.setLevel(logging.INFO)
    try:
        code = main()
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    sys.exit(code or 0)


COMMANDS = (
    "train",
    "tune",
    "register",
    "predict",
    "serve",
    "evaluate",
    "make-shards",
    "sync-tracking",
    "report",
)


def main() -> None:
    """The ``yolov9-ray`` console script."""
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(
            f"usage: yolov9-ray {{{','.join(COMMANDS)}}} [options]  (--help after a command)", file=sys.stderr
        )
        sys.exit(USER_ERROR_EXIT)
    command = sys.argv.pop(1)
    sys.argv[0] = f"yolov9-ray {command}"
    job = importlib.import_module(f"jobs.{command.replace('-', '_')}")
    run(job.main)
