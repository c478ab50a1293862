"""An elastic run on spot-like capacity: the demo config with ``ray.num_workers=[1, 2]`` on a two-node Ray
cluster started here (``ray start``, one CPU per node, 127.0.0.1, token auth). In epoch ``--lose-at`` the
second node's worker gets SIGTERM (a reclaim notice) and the node is killed once the stop's checkpoint is
written; after ``--back-after`` epochs on one worker the node is started again and the run grows back.

    python -m benchmarks.elastic                      # seeds 0 and 1 of the demo
    python -m benchmarks.elastic --seeds 1 train.epochs=4

Prints one JSON line per seed: best and final val mAP@0.5:0.95 and mAP@0.5 (compare them with
``python -m benchmarks.quality`` on the same seeds, a fixed 2-worker run), the world size of each epoch,
seconds from the node's loss to the first step on one worker (restore plus restart, and Ray asking for the
old size first), seconds from its return to the first step on two, and the wall time. About 4-5 minutes
per seed on an idle 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from pipeline.config import load_config
from pipeline.training.job import run_training

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
NODE_PORT_FLAGS = (
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
    "node-manager-port",
    "object-manager-port",
)


class StepLog:
    """Step hook: each worker appends (time, world size, epoch, step, pid) to a file of its own."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __call__(self, state, event) -> None:
        row = {
            "t": time.time(),
            "world": state.world,
            "epoch": event.epoch,
            "step": state.step,
            "pid": os.getpid(),
        }
        with open(self.folder / f"steps-{os.getpid()}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


def rows(folder: Path) -> list[dict]:
    found = [json.loads(line) for p in folder.glob("steps-*.jsonl") for line in p.read_text().splitlines()]
    return sorted(found, key=lambda r: r["t"])


def port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(condition, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")
        time.sleep(0.5)


class TwoNodes:
    """A head and a second node, one CPU each; ``lose()`` kills the second node, ``add()`` starts it again."""

    def __init__(self, folder: Path) -> None:
        os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)})
        os.environ.pop("RAY_ADDRESS", None)
        self.env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
        self.folder, self.gcs = folder, port()
        self.address = f"127.0.0.1:{self.gcs}"
        temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
        self.head = self._start(
            [
                "--head",
                f"--port={self.gcs}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={port()}",
                f"--temp-dir={temp}",
            ],
            "head",
        )
        self.second: subprocess.Popen | None = None

    def _start(self, args: list[str], name: str) -> subprocess.Popen:
        flags = [f"--{flag}={port()}" for flag in NODE_PORT_FLAGS]
        return subprocess.Popen(
            [
                str(BIN / "ray"),
                "start",
                "--block",
                "--node-ip-address=127.0.0.1",
                "--num-cpus=1",
                *args,
                *flags,
            ],
            env=self.env,
            start_new_session=True,
            # a background shell starts its jobs with SIGINT ignored, and `ray start` stops on SIGINT
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            stdout=open(self.folder / f"{name}.log", "a"),
            stderr=subprocess.STDOUT,
        )

    def add(self) -> None:
        self.second = self._start([f"--address={self.address}"], "node")

    def lose(self) -> None:
        os.killpg(self.second.pid, signal.SIGKILL)

    def stop(self) -> None:
        for node in (self.second, self.head):
            if node is not None and node.poll() is None:
                os.killpg(node.pid, signal.SIGINT)
                try:
                    node.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(node.pid, signal.SIGKILL)


def one_seed(seed: int, lose_at: int, back_after: int, overrides: list[str], folder: Path) -> dict:
    data, steps_log = folder / "data", folder / "steps"
    steps_log.mkdir()
    cluster = TwoNodes(folder)
    try:
        time.sleep(5)
        cluster.add()
        cfg = load_config(
            REPO / "jobs" / "configs" / "demo.yaml",
            [
                f"data.root={data}",
                f"train.seed={seed}",
                "ray.num_workers=[1, 2]",
                "ray.resize_check_s=10",
                "ray.max_failures=-1",
                f"ray.address={cluster.address}",
                f"ray.storage_path={folder / 'ray'}",
                f"mlflow.tracking_uri=sqlite:///{folder / 'mlflow.db'}",
                *overrides,
            ],
        )
        if lose_at + back_after >= cfg.train.epochs:
            raise SystemExit(
                f"--lose-at {lose_at} + --back-after {back_after}: no epoch of {cfg.train.epochs} to grow in"
            )
        os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "30"
        outcome: dict = {}
        started = time.time()

        def train() -> None:
            try:
                outcome["summary"] = run_training(cfg, loop_extras={"step_hooks": [StepLog(steps_log)]})
            except BaseException as e:  # noqa: BLE001 -- reported below
                outcome["error"] = e

        trainer = threading.Thread(target=train, daemon=True)
        trainer.start()
        steps = cfg.data.synthetic.num_train // (cfg.train.batch_size * 2)
        mid = (lose_at - 1) * steps + steps // 2
        wait(lambda: any(r["world"] == 2 and r["step"] >= mid for r in rows(steps_log)), "mid-epoch", 900)
        victim = next(r["pid"] for r in reversed(rows(steps_log)) if r["world"] == 2)
        before = len(list((folder / "ray" / cfg.ray.run_name).glob("checkpoint_*")))
        os.kill(victim, signal.SIGTERM)
        wait(
            lambda: len(list((folder / "ray" / cfg.ray.run_name).glob("checkpoint_*"))) > before,
            "the stop",
            120,
        )
        lost_at = time.time()
        cluster.lose()
        wait(lambda: any(r["world"] == 1 for r in rows(steps_log)), "one worker", 600)
        resumed = next(r for r in rows(steps_log) if r["world"] == 1)
        back_step = (resumed["epoch"] + back_after) * steps
        wait(lambda: any(r["world"] == 1 and r["step"] >= back_step for r in rows(steps_log)), "epochs", 1200)
        back_at = time.time()
        cluster.add()
        trainer.join()
        if "error" in outcome:
            raise outcome["error"]
        summary = outcome["summary"]
        client = MlflowClient(summary.mlflow_uri)

        def history(key: str) -> list[float]:
            return [
                m.value
                for m in sorted(client.get_metric_history(summary.mlflow_run_id, key), key=lambda m: m.step)
            ]

        grown = [r["t"] for r in rows(steps_log) if r["world"] == 2 and r["t"] > back_at]
        maps, maps50 = history("val/map50_95"), history("val/map50")
        return {
            "bench": "elastic",
            "seed": seed,
            "best_map50_95": round(max(maps), 4),
            "final_map50_95": round(maps[-1], 4),
            "best_map50": round(max(maps50), 4),
            "final_map50": round(maps50[-1], 4),
            "world_size_per_epoch": [int(v) for v in history("train/world_size")],
            "loss_to_one_worker_s": round(resumed["t"] - lost_at, 1),
            "return_to_two_workers_s": round(grown[0] - back_at, 1) if grown else None,
            "wall_s": round(time.time() - started, 1),
        }
    finally:
        import ray

        ray.shutdown()
        cluster.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--lose-at", type=int, default=3, help="the epoch (1-based) the node is lost in")
    parser.add_argument("--back-after", type=int, default=2, help="epochs on one worker before it returns")
    parser.add_argument("overrides", nargs="*", help="section.key=value on top of the demo config")
    args = parser.parse_intermixed_args(argv)  # options after overrides too
    if args.seeds > 1:
        # a process connects to one Ray cluster in its life: a second ray.init after a shutdown hung in 2.60
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            one = ["--seeds", "1", "--first-seed", str(seed), "--lose-at", str(args.lose_at)]
            one += ["--back-after", str(args.back_after), *args.overrides]
            subprocess.run([sys.executable, "-m", "benchmarks.elastic", *one], cwd=REPO, check=True)
        return
    with tempfile.TemporaryDirectory(prefix="elastic-bench-") as tmp:
        result = one_seed(args.first_seed, args.lose_at, args.back_after, args.overrides, Path(tmp))
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
