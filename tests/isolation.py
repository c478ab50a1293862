"""Test modules that connect the test process to Ray (they use the `local_ray` fixture, or are marked
`own_process`) run in a pytest process of their own; their reports are replayed here, one per test as if
it had run in this process. Those processes run beside this one: while this process runs the other tests,
a pool keeps module processes going, so that the time a Ray test spends waiting (a worker group starting, a
server coming up) is spent on another test's work.

Modules marked `process_group(name)` share one process, and so one Ray instance (`local_ray` is
session-scoped), one after the other: a Ray instance and a pytest process cost about 10 CPU-seconds to
start. The searches share one (test_tune, test_study). The group `beside-main` holds in-process tests
that need no Ray (test_jobs_cli, test_reference_checkpoint, test_prune, test_infra: half the inner loop's
CPU time): every test process computes on one thread, so without it the inner loop (`-m "not slow"`,
where almost no module runs apart) kept the second core idle. A module that needs an instance set up its own
way (an environment its Ray workers must inherit) or a cluster of its own stays unmarked, and so do the
fault-injection trainings: grouped with test_train and test_faults, test_preemption's first Ray Train run
never started (killed after 20 min), the failure test_preemption's and test_tracking_outage's docstrings
describe; it is not understood, so they keep fresh instances.

Why a process, and never a second instance in one: in Ray 2.60 a local instance that has run
fault-injection trainings can leave `ray.shutdown()` blocked in the driver (inside the GCS subscriber's
close), holding Ray's connect lock, so that the process can neither start another instance nor exit (Ray's
atexit hook waits on the same lock). Seen in CI as a suite that hung until killed. So a process starts one
instance at most and shuts it down only at its end, bounded; a process that hangs fails after
`MODULE_TIMEOUT_S` instead of holding the suite.

How many test processes run at once: `YOLOV9_TEST_PROCESSES` (default 2, one per core of the 2-core
machines the suite is sized for; 1 runs every module process after the other). While this process still
runs tests of its own it counts as one of them. Module processes start longest first (`module_cost`), so
that the last to finish is not a long one started late.

Hooks are imported into `conftest.py`, which is where pytest looks for them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPORTS_ENV = "YOLOV9_TEST_REPORTS"  # set in a module's own process: the file its reports go to
PROCESSES_ENV = "YOLOV9_TEST_PROCESSES"
SHARED_ENV = "YOLOV9_TEST_SHARED"  # a folder the processes of one session share: module logs, port claims
MODULE_TIMEOUT_S = 1200
ISOLATING_FIXTURE = "local_ray"
ISOLATING_MARKER = "own_process"  # for modules that connect to a Ray cluster of their own
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
COST_MARKER = "cost"  # pytest.mark.cost(seconds): a module's rough duration, for the start order only
GROUP_MARKER = "process_group"  # pytest.mark.process_group(name): modules that share one process


@dataclass
class ModuleRun:
    """What a module's own pytest process left: its reports by node id, and how it ended."""

    ended: str
    output_tail: str
    seconds: float
    reports: dict[str, list[pytest.TestReport]] = field(default_factory=dict)


def in_module_process() -> bool:
    return REPORTS_ENV in os.environ


def processes() -> int:
    """How many test processes run at once (``YOLOV9_TEST_PROCESSES``, default 2)."""
    return max(1, int(os.environ.get(PROCESSES_ENV, "2")))


def module_cost(items: list[pytest.Item]) -> float:
    """Seconds a module's process is expected to take: its module-level `cost` mark, else a guess from its
    tests' marks. Only the start order depends on it."""
    marked = items[0].getparent(pytest.Module).get_closest_marker(COST_MARKER)
    if marked:
        return float(marked.args[0])
    return sum(30.0 if item.get_closest_marker("slow") else 1.0 for item in items)


def process_name(module: pytest.Module) -> str:
    """The name of the process a module runs apart in: its `process_group` mark's, else its own."""
    group = module.get_closest_marker(GROUP_MARKER)
    return f"group-{group.args[0]}" if group else module.path.stem


class ModulePool:
    """Runs the module processes (each named, with the node ids of its tests), at most ``slots`` at once
    (one fewer while ``main_busy``)."""

    def __init__(self, config: pytest.Config, processes: dict[str, list[str]], slots: int) -> None:
        self.config = config
        self.queue = list(processes.items())  # already in start order
        self.slots = max(1, slots)
        self.main_busy = True
        self.runs: dict[str, ModuleRun] = {}
        self.done: dict[str, threading.Event] = {name: threading.Event() for name in processes}
        self.shared = tempfile.mkdtemp(prefix="yolov9-tests-")
        self._running: dict[str, tuple[subprocess.Popen, float]] = {}  # process, start time
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="module-pool", daemon=True)

    def start(self) -> None:
        os.environ[SHARED_ENV] = self.shared
        self._thread.start()

    def result(self, name: str) -> ModuleRun:
        """Wait for process ``name`` to end; from now on this process only waits, so its slot is free."""
        self.main_busy = False
        self.done[name].wait()
        return self.runs[name]

    def stop(self) -> None:
        """End every module process still running (an interrupted or failed-fast session)."""
        self._stop.set()
        self._thread.join(timeout=30)
        for child, _ in list(self._running.values()):
            _kill_group(child)
        shutil.rmtree(self.shared, ignore_errors=True)

    def _run(self) -> None:
        while not self._stop.is_set() and (self.queue or self._running):
            allowed = max(1, self.slots - (1 if self.main_busy else 0))
            while self.queue and len(self._running) < allowed:
                name, nodeids = self.queue.pop(0)
                self._running[name] = (self._launch(name, nodeids), time.monotonic())
            for name, (child, started) in list(self._running.items()):
                timed_out = time.monotonic() - started > MODULE_TIMEOUT_S
                if child.poll() is None and not timed_out:
                    continue
                ended = (
                    f"killed after {MODULE_TIMEOUT_S} s" if timed_out else f"exit status {child.returncode}"
                )
                _kill_group(child)
                del self._running[name]
                self.runs[name] = self._collect(name, ended, time.monotonic() - started)
                self.done[name].set()
            time.sleep(0.2)

    def _folder(self, name: str) -> Path:
        return Path(self.shared) / "modules" / name

    def _launch(self, name: str, nodeids: list[str]) -> subprocess.Popen:
        """A child pytest for its modules' tests, in a session (process group) of its own: a timeout, and
        the end of the process, stop everything it started that did not stop with it."""
        folder = self._folder(name)
        folder.mkdir(parents=True)
        env = {**os.environ, REPORTS_ENV: str(folder / "reports.jsonl")}
        args = ["-q", "-p", "no:cacheprovider", f"--basetemp={folder / 'tmp'}", *nodeids]
        with open(folder / "output.log", "w") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "pytest", *args],
                cwd=self.config.rootpath,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _collect(self, name: str, ended: str, seconds: float) -> ModuleRun:
        folder = self._folder(name)
        run = ModuleRun(ended=ended, output_tail=(folder / "output.log").read_text()[-6000:], seconds=seconds)
        reports_file = folder / "reports.jsonl"
        if reports_file.exists():
            for line in reports_file.read_text().splitlines():
                data = json.loads(line)
                report = self.config.hook.pytest_report_from_serializable(config=self.config, data=data)
                run.reports.setdefault(report.nodeid, []).append(report)
        return run


def _kill_group(child: subprocess.Popen) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait()


_processes: dict[str, list[str]] = {}  # process name -> node ids of its selected tests, in start order
_process_of: dict[Path, str] = {}  # a module run apart -> the name of its process
_pool: ModulePool | None = None


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules run apart go last (this process runs its own tests first, beside the pool), their processes
    longest first."""
    if in_module_process():
        return
    by_module: dict[Path, list[pytest.Item]] = {}
    for item in items:
        by_module.setdefault(item.path, []).append(item)
    apart = {path: its for path, its in by_module.items() if any(_runs_apart(item) for item in its)}
    grouped: dict[str, list[list[pytest.Item]]] = {}
    for its in apart.values():
        grouped.setdefault(process_name(its[0].getparent(pytest.Module)), []).append(its)
    order = sorted(grouped, key=lambda name: -sum(module_cost(its) for its in grouped[name]))
    _processes.clear()
    _processes.update({name: [item.nodeid for its in grouped[name] for item in its] for name in order})
    _process_of.clear()
    _process_of.update({its[0].path: name for name in order for its in grouped[name]})
    in_order = [item for name in order for its in grouped[name] for item in its]
    items[:] = [item for item in items if item.path not in apart] + in_order


def _runs_apart(item: pytest.Item) -> bool:
    marked = item.get_closest_marker(ISOLATING_MARKER) is not None
    return marked or ISOLATING_FIXTURE in getattr(item, "fixturenames", ())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtestloop(session: pytest.Session):
    global _pool
    if not in_module_process() and _processes and not session.config.option.collectonly:
        _pool = ModulePool(session.config, _processes, processes())
        _pool.start()
    try:
        yield
    finally:
        if _pool is not None:
            _pool.stop()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    if in_module_process() or _pool is None or item.path not in _process_of:
        return None
    run = _pool.result(_process_of[item.path])
    reports = run.reports.get(item.nodeid) or [missing_report(item, run)]
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    for report in reports:
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


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
    if not in_module_process() and processes() > 1:
        # One compute thread per test process (and so per Ray driver, job and worker it starts), set before
        # torch is imported: with two processes on two cores, torch's default of a thread per core had every
        # parallel region wait for a thread the other process held, and the suite spent twice the CPU time.
        for name in THREAD_ENV:
            os.environ.setdefault(name, "1")
    # An `mlflow server` (the tests' tracking servers, `mlflow ui`) otherwise starts a job runner with two
    # huey consumer processes for MLflow's GenAI jobs, which no test uses: CPU time taken from the tests.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not in_module_process() or _config is None:
        return
    data = _config.hook.pytest_report_to_serializable(config=_config, report=report)
    with open(os.environ[REPORTS_ENV], "a") as out:
        out.write(json.dumps(data, default=str) + "\n")


def write_module_times(terminalreporter) -> None:
    """The module processes' wall times, longest first: where a suite's time goes beyond single tests."""
    if _pool is None or not _pool.runs:
        return
    terminalreporter.section("module processes (wall seconds, run beside the in-process tests)")
    for name, run in sorted(_pool.runs.items(), key=lambda item: -item[1].seconds):
        terminalreporter.write_line(f"{run.seconds:7.1f} s  {name} ({run.ended})")


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
