"""Test modules that connect the test process to Ray (they use the `local_ray` fixture, or are marked
`own_process`) run in a pytest process of their own; their reports are replayed here, one per test as if
it had run in this process.

Why: in Ray 2.60 a local instance that has run fault-injection trainings can leave `ray.shutdown()` blocked
in the driver (inside the GCS subscriber's close), holding Ray's connect lock, so that the process can
neither start the next module's instance nor exit (Ray's atexit hook waits on the same lock). Seen in CI as
a suite that hung until killed. A process per module makes every module start from a clean driver, and a
module that hangs fails after `MODULE_TIMEOUT_S` instead of holding the suite.

Hooks are imported into `conftest.py`, which is where pytest looks for them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPORTS_ENV = "YOLOV9_TEST_REPORTS"  # set in a module's own process: the file its reports go to
MODULE_TIMEOUT_S = 1200
ISOLATING_FIXTURE = "local_ray"
ISOLATING_MARKER = "own_process"  # for modules that connect to a Ray cluster of their own


@dataclass
class ModuleRun:
    """What a module's own pytest process left: its reports by node id, and how it ended."""

    ended: str
    output_tail: str
    reports: dict[str, list[pytest.TestReport]] = field(default_factory=dict)


_modules: dict[Path, list[str]] = {}  # module -> node ids of its selected tests, for modules run apart
_runs: dict[Path, ModuleRun] = {}


def in_module_process() -> bool:
    return REPORTS_ENV in os.environ


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if in_module_process():
        return
    by_module: dict[Path, list[pytest.Item]] = {}
    for item in items:
        by_module.setdefault(item.path, []).append(item)
    for path, module_items in by_module.items():
        if any(_runs_apart(item) for item in module_items):
            _modules[path] = [item.nodeid for item in module_items]


def _runs_apart(item: pytest.Item) -> bool:
    marked = item.get_closest_marker(ISOLATING_MARKER) is not None
    return marked or ISOLATING_FIXTURE in getattr(item, "fixturenames", ())


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    if in_module_process() or item.path not in _modules:
        return None
    if item.path not in _runs:
        _runs[item.path] = run_module_apart(item.config, _modules[item.path])
    run = _runs[item.path]
    reports = run.reports.get(item.nodeid) or [missing_report(item, run)]
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    for report in reports:
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


def run_module_apart(config: pytest.Config, nodeids: list[str]) -> ModuleRun:
    """Run ``nodeids`` (one module's tests) in a child pytest; its reports by node id.

    The child has a session (process group) of its own: a timeout, and the end of the module, stop
    everything it started that did not stop with it."""
    with tempfile.TemporaryDirectory(prefix="module-reports-") as folder:
        reports_file, log_file = Path(folder) / "reports.jsonl", Path(folder) / "output.log"
        env = {**os.environ, REPORTS_ENV: str(reports_file)}
        with open(log_file, "w") as log:
            child = subprocess.Popen(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *nodeids],
                cwd=config.rootpath,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                child.wait(timeout=MODULE_TIMEOUT_S)
                ended = f"exit status {child.returncode}"
            except subprocess.TimeoutExpired:
                ended = f"killed after {MODULE_TIMEOUT_S} s"
            finally:
                try:
                    os.killpg(child.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                child.wait()
        run = ModuleRun(ended=ended, output_tail=log_file.read_text()[-6000:])
        if reports_file.exists():
            for line in reports_file.read_text().splitlines():
                report = config.hook.pytest_report_from_serializable(config=config, data=json.loads(line))
                run.reports.setdefault(report.nodeid, []).append(report)
        return run


def missing_report(item: pytest.Item, run: ModuleRun) -> pytest.TestReport:
    return pytest.TestReport(
        nodeid=item.nodeid,
        location=item.location,
        keywords={},
        outcome="failed",
        longrepr=f"no result from the module's own pytest process ({run.ended}); its last output:\n"
        + run.output_tail,
        when="call",
    )


_config: pytest.Config | None = None
_exit_status = 0


def pytest_configure(config: pytest.Config) -> None:
    global _config
    _config = config


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not in_module_process() or _config is None:
        return
    data = _config.hook.pytest_report_to_serializable(config=_config, report=report)
    with open(os.environ[REPORTS_ENV], "a") as out:
        out.write(json.dumps(data, default=str) + "\n")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _exit_status
    _exit_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    if in_module_process():
        # Ray's atexit hook can block forever on a shutdown that hung (see the module docstring); the
        # reports are written, the parent stops what is left in this process group
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status)
