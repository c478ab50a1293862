"""Waiting on a condition, as every test that waits for something does: poll it until a deadline, and fail
naming what was waited for."""

import socket
import time
from collections.abc import Callable


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float, poll_s: float = 0.2) -> None:
    """Return once ``condition()`` is true; raise TimeoutError naming ``what`` after ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:g} s for {what}")
        time.sleep(poll_s)


def accepts_connections(port: int) -> bool:
    """True once a server listens on 127.0.0.1:``port``: a cheap first wait before a costlier probe."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
