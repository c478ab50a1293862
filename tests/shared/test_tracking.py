"""Experiments the pipeline creates keep their artifacts with the store, not in the working folder."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from pipeline.tracking import experiment_id, resolve_tracking_uri


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


def test_relative_sqlite_uri_means_the_callers_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path}/mlflow.db"
    assert resolve_tracking_uri("sqlite:///stores/a.db") == f"sqlite:///{tmp_path}/stores/a.db"


def test_relative_sqlite_uri_from_the_environment_is_resolved_too(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path}/env.db"


def test_absolute_and_server_uris_are_kept_as_given(tmp_path):
    assert resolve_tracking_uri(f"sqlite:///{tmp_path}/m.db") == f"sqlite:///{tmp_path}/m.db"
    assert resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_a_resolved_relative_uri_opens_the_same_store_from_another_folder(tmp_path, monkeypatch):
    (tmp_path / "user").mkdir()
    (tmp_path / "trial").mkdir()
    monkeypatch.chdir(tmp_path / "user")
    uri = resolve_tracking_uri("sqlite:///mlflow.db")
    created = experiment_id(MlflowClient(uri), uri, "search")
    monkeypatch.chdir(tmp_path / "trial")  # where Ray Tune runs a trial
    assert MlflowClient(uri).get_experiment(created).name == "search"
    assert not any((tmp_path / "trial").iterdir())
