"""Experiment configuration: typed sections, overrides, and errors that name the file and the key."""

import logging
import re
from pathlib import Path

import pytest

from pipeline.config import Config, ConfigError, config_from_dict, load_config

CONFIGS = Path(__file__).parents[2] / "jobs" / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_reference_recipe():
    cfg = Config()
    assert (cfg.train.lr0, cfg.train.momentum, cfg.train.weight_decay) == (0.01, 0.937, 5e-4)
    assert (cfg.train.nominal_batch, cfg.train.close_mosaic, cfg.train.clip_grad_norm) == (64, 15, 10.0)
    assert (cfg.loss.aux_weight, cfg.loss.lead_weight, cfg.loss.tal_topk) == (0.25, 1.0, 10)
    assert (cfg.loss.box, cfg.loss.cls, cfg.loss.dfl) == (7.5, 0.5, 1.5)


def test_yaml_sections_and_overrides_are_typed(tmp_path):
    path = write(tmp_path, "model: {name: yolov9-t}\ntrain: {epochs: 5, lr0: 0.02}\n")
    cfg = load_config(
        path, ["train.batch_size=4", "loss.aux_weight=1", "ray.use_gpu=true", "data.synthetic.seed=3"]
    )
    assert cfg.model.name == "yolov9-t" and cfg.train.epochs == 5 and cfg.train.batch_size == 4
    assert cfg.loss.aux_weight == 1.0 and isinstance(cfg.loss.aux_weight, float)
    assert cfg.ray.use_gpu is True
    assert cfg.data.synthetic is not None and cfg.data.synthetic.seed == 3


def test_local_paths_become_absolute_and_urls_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.root=shards", "ray.storage_path=s3://bucket/runs"])
    assert cfg.data.root == str(tmp_path / "shards")
    assert cfg.ray.storage_path == "s3://bucket/runs"


def test_round_trip_through_a_plain_dict():
    cfg = load_config(CONFIGS / "demo.yaml")
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_load(name):
    load_config(CONFIGS / name)


@pytest.mark.parametrize(
    "text, key",
    [
        ("train: {epochs: 5, lr: 0.1}\n", "train.lr"),
        ("trian: {epochs: 5}\n", "trian"),
        ("train: {batch_size: 0}\n", "train.batch_size"),
        ("train: {lr0: -0.01}\n", "train.lr0"),
        ("train: {imgsz: 300}\n", "train.imgsz"),
        ("train: {epochs: five}\n", "train.epochs"),
        ("train: {epochs: 2.5}\n", "train.epochs"),
        ("ray: {use_gpu: maybe}\n", "ray.use_gpu"),
        ("loss: {assign: both}\n", "loss.assign"),
        ("model: {name: yolov9-x}\n", "model.name"),
        ("data: {synthetic: 3}\n", "data.synthetic"),
        ("data: {augment: {mosaic: 1.5}}\n", "data.augment"),
        ("data: {augment: {mosiac: 1.0}}\n", "data.augment.mosiac"),
    ],
)
def test_bad_values_name_the_file_and_the_key(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and key in str(err.value)


def test_bad_override_syntax_is_rejected():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["train.epochs"])


def test_an_override_under_tune_space_sets_one_searched_key_with_its_dots(tmp_path):
    path = write(tmp_path, "tune:\n  space:\n    loss.aux_weight: {uniform: [0.1, 1.0]}\n")
    cfg = load_config(
        path,
        [
            "tune.space.train.lr0={loguniform: [0.001, 0.1]}",
            "tune.space.data.augment.scale={choice: [0.2, 0.5]}",
        ],
    )
    assert cfg.tune.space == {
        "loss.aux_weight": {"uniform": [0.1, 1.0]},
        "train.lr0": {"loguniform": [0.001, 0.1]},
        "data.augment.scale": {"choice": [0.2, 0.5]},
    }


def test_missing_file_and_invalid_yaml_are_reported(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))


def test_an_unquoted_off_for_a_text_key_says_to_quote_it():
    with pytest.raises(ConfigError, match="train.amp must be a str, got False .*train.amp='off'"):
        load_config(None, ["train.amp=off"])


def test_a_relative_path_is_resolved_against_the_current_folder_and_logged(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO, logger="pipeline.config"):
        cfg = load_config(None, ["data.root=shards/coco", f"ray.storage_path={tmp_path / 'runs'}"])
    assert cfg.data.root == str(tmp_path / "shards" / "coco")
    assert [r.getMessage() for r in caplog.records] == [
        f"data.root shards/coco is a relative path: using {tmp_path / 'shards' / 'coco'}"
    ]


def test_an_elastic_worker_range_is_read_and_a_bad_one_is_named():
    cfg = load_config(None, ["ray.num_workers=[1, 2]"])
    assert (cfg.ray.elastic, cfg.ray.min_workers, cfg.ray.max_workers) == (True, 1, 2)
    assert not load_config(None, ["ray.num_workers=3"]).ray.elastic
    for bad, said in [
        ("[2, 1]", "MIN <= MAX"),
        ("[1, 2, 3]", "a range [MIN, MAX] of two integers"),
        ("[0, 2]", "must be >= 1"),
        ("[a, 2]", "must be an integer, got 'a'"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(said)):
            load_config(None, [f"ray.num_workers={bad}"])
