"""benchmarks/quality.py as typed: options may come between the config overrides."""

import pytest

from benchmarks.quality import absolute_data_root, main


def test_options_between_the_overrides_are_taken():
    with pytest.raises(SystemExit, match="nope.yaml does not exist"):
        main(["train.epochs=3", "--config", "nope.yaml", "--seeds", "1", "train.batch_size=4"])


def test_a_relative_data_root_is_taken_from_where_it_was_typed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_data_root("data.root=data/trees") == f"data.root={tmp_path / 'data' / 'trees'}"


def test_urls_absolute_paths_and_other_keys_are_left_as_typed():
    for override in ("data.root=s3://bucket/trees", "data.root=/mnt/trees", "train.epochs=3"):
        assert absolute_data_root(override) == override
