"""Every job, typed with a user's mistake, exits non-zero with one `error: ...` line and no traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import USER_ERROR_EXIT
from tests.conftest import free_port

pytestmark = [pytest.mark.own_process, pytest.mark.process_group("beside-main"), pytest.mark.cost(45)]

REPO = Path(__file__).resolve().parents[2]


def job(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m jobs.<args>`` in ``cwd`` (the repository on the path, as an installed package is)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def assert_one_line_error(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode == USER_ERROR_EXIT, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last, result.stderr[-2000:]


def test_train_with_a_missing_config_file(tmp_path):
    assert_one_line_error(
        job("jobs.train", "--config", "nope.yaml", cwd=tmp_path), "config file nope.yaml does not exist"
    )


def test_train_takes_options_between_the_overrides(tmp_path):
    result = job("jobs.train", "train.epochs=3", "--config", "nope.yaml", "train.batch_size=4", cwd=tmp_path)
    assert_one_line_error(result, "config file nope.yaml does not exist")


def test_train_with_an_impossible_value(tmp_path):
    assert_one_line_error(job("jobs.train", "train.epochs=0", cwd=tmp_path), "train.epochs must be >= 1")


def test_train_with_an_unreachable_tracking_server(tmp_path, tiny_shards):
    uri = f"http://127.0.0.1:{free_port()}"
    result = job("jobs.train", f"data.root={tiny_shards}", f"mlflow.tracking_uri={uri}", cwd=tmp_path)
    assert_one_line_error(result, f"MLflow tracking server {uri} is unreachable")


def test_tune_with_an_unknown_search_key(tmp_path):
    result = job("jobs.tune", "tune.space={loss.aux_wieght: {uniform: [0.1, 1.0]}}", cwd=tmp_path)
    assert_one_line_error(result, "tune.space.loss.aux_wieght is not a usable config key")


def test_tune_takes_options_between_the_overrides(tmp_path):
    result = job("jobs.tune", "tune.num_samples=2", "--config", "nope.yaml", "train.epochs=3", cwd=tmp_path)
    assert_one_line_error(result, "config file nope.yaml does not exist")


def test_evaluate_a_missing_checkpoint(tmp_path, tiny_shards):
    result = job("jobs.evaluate", "--checkpoint", "gone", "--data", str(tiny_shards), cwd=tmp_path)
    assert_one_line_error(result, "no checkpoint at gone")


def test_register_an_unknown_source(tmp_path):
    assert_one_line_error(
        job("jobs.register", "--run", "no-such-experiment", cwd=tmp_path), "no-such-experiment"
    )


def test_predict_from_an_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    result = job(
        "jobs.predict", "--model", "models:/m@champion", "--source", "empty", "--out", "o", cwd=tmp_path
    )
    assert_one_line_error(result, "empty holds no")


def test_predict_with_a_model_that_is_not_registered(tmp_path, tiny_shards):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(b"\xff\xd8 not really decoded before the model loads")
    result = job(
        "jobs.predict", "--model", "models:/absent@champion", "--source", "images", "--out", "o", cwd=tmp_path
    )
    assert_one_line_error(result, "cannot load --model models:/absent@champion")
    assert not (tmp_path / "mlflow.db").exists()  # no empty store left behind in the user's folder


def test_serve_with_a_model_that_is_not_registered_fails_before_anything_starts(tmp_path):
    result = job("jobs.serve", "--model", "models:/absent@champion", cwd=tmp_path)
    assert_one_line_error(result, "cannot load --model models:/absent@champion")
    assert not (tmp_path / "mlflow.db").exists()


def test_serve_with_fewer_max_than_min_replicas(tmp_path):
    result = job("jobs.serve", "--model", "m", "--min-replicas", "3", "--max-replicas", "2", cwd=tmp_path)
    assert_one_line_error(result, "need 1 <= min_replicas <= max_replicas, got 3, 2")


@pytest.mark.parametrize(
    "module", ["train", "tune", "evaluate", "register", "predict", "serve", "make_shards", "sync_tracking"]
)
def test_every_job_runs_through_the_cli_wrapper(module):
    source = (REPO / "jobs" / f"{module}.py").read_text()
    assert source.rstrip().endswith('if __name__ == "__main__":\n    run(main)')


def test_the_console_script_runs_the_same_jobs(tmp_path):
    script = Path(sys.executable).parent / "yolov9-ray"
    result = subprocess.run(
        [str(script), "train", "--config", "nope.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_line_error(result, "config file nope.yaml does not exist")


def test_the_console_script_lists_its_commands(tmp_path):
    result = subprocess.run([str(Path(sys.executable).parent / "yolov9-ray")], capture_output=True, text=True)
    assert result.returncode == USER_ERROR_EXIT
    assert "{train,tune,register,predict,serve,evaluate,make-shards,sync-tracking,report}" in result.stderr
