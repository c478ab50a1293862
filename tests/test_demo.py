"""The README's first command: `python -m jobs.train` with no arguments, in a fresh directory.

It generates the synthetic shards, starts its own local Ray, trains the demo config with two
workers, and must end with a model that clearly learned (a model that learned nothing scores ~0).
"""

import os
import re
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from pipeline.checkpoint import load_checkpoint

pytestmark = [pytest.mark.ray, pytest.mark.slow]

LEARNED_MAP50 = 0.5


def test_the_demo_trains_a_detector_that_learned(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    demo = subprocess.run(
        [sys.executable, "-m", "jobs.train"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]

    found = re.search(r"best mAP@0\.5:0\.95 ([\d.]+), mAP@0\.5 ([\d.]+) after (\d+) epochs", demo.stdout)
    assert found, demo.stdout[-2000:]
    map50_95, map50, epochs = float(found[1]), float(found[2]), int(found[3])
    assert map50 >= LEARNED_MAP50, f"the demo model did not learn: mAP@0.5 {map50}"
    assert map50_95 > 0.2

    checkpoint = re.search(r"best checkpoint:\s+(\S+)", demo.stdout)[1]
    state = load_checkpoint(checkpoint)
    assert state["epoch"] <= epochs and state["best_map"] == pytest.approx(map50_95, abs=1e-4)
    assert (tmp_path / "data" / "synthetic" / "val-coco.json").is_file()

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("yolov9-demo").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["loss.aux_weight"] == "0.25" and run.data.params["model.name"] == "yolov9-t"
    assert run.data.tags["dataset.manifest_hash"] and run.data.tags["dataset.val_manifest_hash"]
    assert len(client.get_metric_history(run.info.run_id, "val/map50_95")) == epochs
    assert {"config.yaml", "curves.png", "val_predictions.png"} <= {
        a.path for a in client.list_artifacts(run.info.run_id)
    }
