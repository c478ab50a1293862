"""What every job does around its one call: log lines to the terminal (or the Ray job log), and a user's
mistake reported as one line with a non-zero exit code instead of a traceback."""

from __future__ import annotations

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
