"""benchmarks/suite_cpu.py: a command's CPU time by kind of process, its grandchildren included."""

import json
import sys

from benchmarks.suite_cpu import kind_of, main

# A child that starts a grandchild, which spends CPU time and then waits long enough to be sampled.
BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\ntime.sleep(0.5)"
PARENT = f"import subprocess, sys; sys.exit(subprocess.run([sys.executable, '-c', {BURN!r}]).returncode + 3)"


def test_a_grandchilds_cpu_time_is_counted_and_the_exit_status_passed_on(capsys):
    assert main(["--interval", "0.1", "--", sys.executable, "-c", PARENT]) == 3
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    *kinds, summary = lines
    assert summary["exit_status"] == 3 and summary["command_cpu_s"] >= 0.5
    assert sum(k["processes"] for k in kinds) == 2  # the child and its grandchild


def test_ray_processes_are_told_apart_by_their_titles():
    assert kind_of({"ray::RayTrainWorker.train_fn"}) == "ray train workers"
    assert kind_of({"/venv/bin/python default_worker.py", "ray::TrainController.run"}) == (
        "ray train/tune per-run actors"
    )
    assert kind_of({"/venv/bin/gcs_server --log_dir=/tmp/ray"}) == "ray daemons"
    assert kind_of({"python -m pytest -q tests/x.py"}) == "pytest processes"
