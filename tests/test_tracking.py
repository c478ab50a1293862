"""Experiments the pipeline creates keep their artifacts with the store, not in the working folder."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from pipeline.tracking import experiment_id


def test_sqlite_experiment_keeps_artifacts_next_to_the_database(tmp_path, monkeypatch):
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # MLflow's default would be ./mlruns of this folder
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    client = MlflowClient(uri)
    run = client.create_run(experiment_id(client, uri, "my/exp"))
    client.log_text(run.info.run_id, "hello", "note.txt")
    written = list((tmp_path / "store" / "mlartifacts").rglob("note.txt"))
    assert [p.read_text() for p in written] == ["hello"]
    assert not any(Path(elsewhere).iterdir())


def test_existing_experiment_is_reused(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    assert experiment_id(client, uri, "train") == experiment_id(client, uri, "train")
