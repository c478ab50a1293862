"""Training quality over seeds: is a change better, worse, or inside the seed-to-seed noise?

    python -m benchmarks.quality                               # the demo config, seeds 0-4, this checkout
    python -m benchmarks.quality --seeds 3 --against HEAD~1    # and the same at another revision
    python -m benchmarks.quality --config jobs/configs/finetune.yaml --seeds 3 train.epochs=20

Each seed is one ``python -m jobs.train --config CONFIG train.seed=S ...`` typed in a fresh folder of its
revision (the data is generated once per revision, as the demo does, and shared by its seeds; a relative
``data.root=PATH`` override is taken from where the benchmark was typed), so the whole job is measured:
Ray Train, the real loader, the real step, the real validation. ``--against REV`` checks REV out in a
temporary git worktree and runs the same seeds there, with REV's own copy of the config (its path is
taken relative to the repository), in the same invocation and environment.

Prints one JSON line per seed (best and final val mAP@0.5:0.95 and mAP@0.5 from the run's MLflow
history, mAP@0.5:0.95 after each epoch, the job's wall time and the MLflow run's own duration), a
summary line per revision (mean and sample standard deviation over seeds) and, with ``--against``, the
difference of the means with its standard error. A difference under about two standard errors is noise.

Cost: one demo job per seed and revision, about 2.5-3 min each on an idle 2-core CPU (AVX512): the
default 5 seeds take about 14 min, 5 seeds against another revision about 28 min.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = Path("jobs/configs/demo.yaml")
MAP, MAP50 = "val/map50_95", "val/map50"
RUN_ID = re.compile(r"^MLflow run:\s+(\w+)", re.MULTILINE)
# what decides a job's folder and tracking: never a developer's exported cluster or server
SCRUBBED_ENV = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "PYTHONPATH")


def emit(**fields: object) -> None:
    print(json.dumps({"bench": "quality", **fields}), flush=True)


@contextmanager
def checkout(revision: str | None) -> Iterator[tuple[Path, str]]:
    """(source root, commit label) of ``revision`` in a temporary worktree; this checkout for None."""
    if revision is None:
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True)
        yield REPO, git_commit(REPO, "HEAD") + ("+changes" if dirty.stdout.strip() else "")
        return
    with tempfile.TemporaryDirectory(prefix="quality-worktree-") as tmp:
        tree = Path(tmp) / "src"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(tree), revision], cwd=REPO, check=True,
            capture_output=True,
        )  # fmt: skip
        try:
            yield tree, git_commit(tree, "HEAD")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=False)


def git_commit(where: Path, rev: str) -> str:
    out = subprocess.run(["git", "rev-parse", "--short", rev], cwd=where, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"error: {rev} is not a revision of {REPO}: {out.stderr.strip()}")
    return out.stdout.strip()


def train_seed(source: Path, folder: Path, config: Path, seed: int, overrides: list[str]) -> dict:
    """One training job of ``source``'s code in ``folder``; its mAP history read from the run's store."""
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    env["PYTHONPATH"] = str(source)  # before the editable install's finder: the revision's own code
    command = [
        sys.executable, "-m", "jobs.train", "--config", str(source / config), f"train.seed={seed}",
        f"ray.run_name=quality-seed-{seed}", f"mlflow.experiment=quality-seed-{seed}", *overrides,
    ]  # fmt: skip
    started = time.monotonic()
    job = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
    wall_s = time.monotonic() - started
    found = RUN_ID.search(job.stdout)
    if job.returncode != 0 or not found:
        tail = (job.stdout + job.stderr)[-3000:]
        raise SystemExit(f"error: seed {seed} of {source} failed (exit {job.returncode}):\n{tail}")
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    run = client.get_run(found[1])
    maps, map50s = (history(client, run.info.run_id, key) for key in (MAP, MAP50))
    best = max(range(len(maps)), key=maps.__getitem__)
    return {
        "seed": seed,
        "best_map50_95": round(maps[best], 4),
        "best_map50": round(map50s[best], 4),  # of the epoch with the best mAP@0.5:0.95, as checkpoints rank
        "final_map50_95": round(maps[-1], 4),
        "final_map50": round(map50s[-1], 4),
        "epochs": len(maps),
        "map50_95_by_epoch": [round(m, 4) for m in maps],
        "wall_s": round(wall_s, 1),
        "run_s": round((run.info.end_time - run.info.start_time) / 1000, 1),
    }


def history(client: MlflowClient, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def summary(seeds: list[dict]) -> dict:
    """Mean and sample standard deviation of each figure over seeds (std 0 for one seed)."""
    out: dict = {"seeds": len(seeds)}
    for key in ("best_map50_95", "best_map50", "final_map50_95", "final_map50", "run_s"):
        values = [s[key] for s in seeds]
        out[f"{key}_mean"] = round(statistics.fmean(values), 4)
        out[f"{key}_std"] = round(statistics.stdev(values), 4) if len(values) > 1 else 0.0
    return out


def difference(this: dict, other: dict, key: str) -> tuple[float, float]:
    """Mean of ``this`` minus mean of ``other`` for ``key`` and the standard error of that difference."""
    se = math.sqrt(
        this[f"{key}_std"] ** 2 / this["seeds"] + other[f"{key}_std"] ** 2 / other["seeds"]
    )  # fmt: skip
    return round(this[f"{key}_mean"] - other[f"{key}_mean"], 4), round(se, 4)


def measure(revision: str | None, args: argparse.Namespace) -> dict:
    with checkout(revision) as (source, commit), tempfile.TemporaryDirectory(prefix="quality-") as tmp:
        if not (source / args.config).is_file():
            raise SystemExit(f"error: {args.config} does not exist at {commit}")
        seeds = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            seeds.append(train_seed(source, Path(tmp), args.config, seed, args.overrides))
            emit(figure="seed", revision=commit, config=str(args.config), **seeds[-1])
        result = {"revision": commit, **summary(seeds)}
        emit(figure="summary", config=str(args.config), overrides=args.overrides, **result)
        return result


def absolute_data_root(override: str) -> str:
    """``data.root=PATH``, a relative local PATH made absolute here: each job runs in a folder of its own."""
    key, _, value = override.partition("=")
    if key != "data.root" or "://" in value or Path(value).is_absolute():
        return override
    return f"data.root={Path(value).resolve()}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=DEMO_CONFIG, help="relative to the repository")
    parser.add_argument("--seeds", type=int, default=5, help="how many seeds (train.seed)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--against", metavar="REV", help="also measure this git revision, same seeds")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides for every job")
    args = parser.parse_intermixed_args(argv)  # options after overrides too
    args.overrides = [absolute_data_root(item) for item in args.overrides]
    if args.config.is_absolute():
        args.config = args.config.relative_to(REPO)
    this = measure(None, args)
    if args.against:
        other = measure(args.against, args)
        diffs = {key: difference(this, other, key) for key in ("best_map50_95", "final_map50_95", "run_s")}
        emit(
            figure="difference", revision=this["revision"], against=other["revision"],
            **{f"{key}_diff": d for key, (d, _) in diffs.items()},
            **{f"{key}_stderr": se for key, (_, se) in diffs.items()},
        )  # fmt: skip


if __name__ == "__main__":
    main()
