"""Where a command's CPU time goes, by kind of process: the test suite's budget is CPU time, not waiting.

    python -m benchmarks.suite_cpu -- python -m pytest -p no:cacheprovider
    python -m benchmarks.suite_cpu --interval 1 -- python -m jobs.train

Runs the command and, every ``--interval`` seconds, reads from /proc (Linux) the CPU time (user + system)
of each of its descendant processes (a process is counted once it has been seen with a counted parent,
so daemons that outlive their parent stay counted) and the names they had (Ray retitles its workers
``ray::TrainController`` and so on). Prints one JSON line per kind of process (CPU seconds, process count),
then one line with the wall time, the CPU seconds the whole machine was busy and how many of them the
command's processes account for; exits with the command's exit status.

A process's CPU time is what it had at the last sample it was seen in: a process that lives less than an
interval may be missed, one that ends loses at most an interval's worth.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# (kind, pattern over the names a process had), first match wins
KINDS = [
    ("ray train workers", r"RayTrainWorker"),
    (
        "ray train/tune per-run actors",
        r"TrainController|PlacementGroupCleaner|SynchronizationActor|DatasetManager|ImplicitFunc|_QueueActor"
        r"|AutoscalingCoordinator|JobSupervisor",
    ),
    ("ray serve/data actors", r"ServeReplica|ServeController|ProxyActor|MapWorker|ReadBinary|ActorLocation"),
    (
        "ray daemons",
        r"gcs_server|raylet|ray/dashboard|ray-dashboard|log_monitor|autoscaler/_private/monitor|runtime_env"
        r"|DashboardAgent|RuntimeEnvAgent|ray start|ray\.util\.client",
    ),
    ("ray workers, idle", r"ray::IDLE|default_worker\.py|setup_worker\.py"),
    ("pytest processes", r"-m pytest|bin/pytest"),
    ("jobs and benchmarks", r"-m jobs\.|yolov9-ray|-m benchmarks\."),
    ("servers (mlflow, moto)", r"mlflow|uvicorn|moto"),
]


@dataclass
class Seen:
    cpu_s: float = 0.0
    names: set[str] = field(default_factory=set)


def read_processes() -> dict[int, tuple[int, int, float, str]]:
    """pid -> (parent pid, start time in ticks, CPU seconds so far, command line) of every process readable
    now. A pid with its start time names one process: pids are reused."""
    tick = os.sysconf("SC_CLK_TCK")
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) "
        cpu_s = (int(fields[11]) + int(fields[12])) / tick
        found[int(entry.name)] = (int(fields[1]), int(fields[19]), cpu_s, cmdline.strip())
    return found


def busy_cpu_s() -> float:
    """CPU seconds the machine has spent not idle since boot (all cores)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    return (sum(values) - idle) / os.sysconf("SC_CLK_TCK")


def kind_of(names: set[str]) -> str:
    text = " ".join(names)
    for kind, pattern in KINDS:
        if re.search(pattern, text):
            return kind
    return "other"


def account(command: list[str], interval_s: float) -> tuple[int, dict[tuple[int, int], Seen], float, float]:
    """Run ``command`` and sample its process tree; returns (exit status, (pid, start) -> Seen, wall s,
    machine busy s)."""
    busy0, start = busy_cpu_s(), time.monotonic()
    child = subprocess.Popen(command)
    seen: dict[tuple[int, int], Seen] = {}
    first = read_processes().get(child.pid)
    if first is not None:
        seen[(child.pid, first[1])] = Seen()
    while True:
        ended = child.poll() is not None
        now = read_processes()
        for pid, (parent, started, cpu_s, cmdline) in now.items():
            key = (pid, started)
            if key not in seen:
                parent_key = (parent, now[parent][1]) if parent in now else None
                if parent_key not in seen:
                    continue
                seen[key] = Seen()
            entry = seen[key]
            entry.cpu_s = max(entry.cpu_s, cpu_s)
            if cmdline:
                entry.names.add(cmdline[:300])
        if ended:
            return child.returncode, seen, time.monotonic() - start, busy_cpu_s() - busy0
        time.sleep(interval_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between samples")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to measure after --")
    code, seen, wall_s, busy_s = account(command, args.interval)
    totals: dict[str, list[float]] = {}
    for entry in seen.values():
        total = totals.setdefault(kind_of(entry.names), [0.0, 0])
        total[0] += entry.cpu_s
        total[1] += 1
    for kind, (cpu_s, count) in sorted(totals.items(), key=lambda item: -item[1][0]):
        print(json.dumps({"kind": kind, "cpu_s": round(cpu_s, 1), "processes": count}))
    print(
        json.dumps(
            {
                "wall_s": round(wall_s, 1),
                "machine_busy_cpu_s": round(busy_s, 1),
                "cores_busy": round(busy_s / wall_s, 2),
                "command_cpu_s": round(sum(t[0] for t in totals.values()), 1),
                "exit_status": code,
            }
        )
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
