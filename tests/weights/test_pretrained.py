"""Starting weights (``model.weights``) and frozen layers (``model.freeze``), without Ray or MLflow.

Sources are the reference implementation's own files (``../shared/fixtures/reference-checkpoints``:
dual yolov9-t with 80 classes, single-branch gelan-t with 3) and checkpoints of this project. Expected
counts come from the layer configs, worked out in the comments.
"""

import math
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import TrainingCheckpoint, save_checkpoint
from pipeline.config import Config, load_config
from pipeline.training import TrainingData, build_train_state, train_one_epoch
from pipeline.weights.pretrained import PretrainedError, load_source, transfer
from yolov9 import build_model

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "reference-checkpoints"
CPU = torch.device("cpu")


def fixture_file(name: str) -> Path:
    path = FIXTURES / name
    if not path.is_file():
        pytest.fail(f"missing fixture {path} (see {FIXTURES / 'README.md'})")
    return path


@pytest.fixture(scope="module")
def yolov9_t_80():
    """The reference's dual yolov9-t file, loaded (read-only: transfer copies out of it)."""
    return load_source(fixture_file("yolov9-t.pt"))


@pytest.fixture(scope="module")
def gelan_t_3():
    return load_source(fixture_file("gelan-t-nc3.pt"))


def same_outputs(a, b) -> bool:
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.allclose(a.eval()(x), b.eval()(x), rtol=1e-5, atol=1e-5)


def test_the_same_layout_and_class_count_loads_every_tensor(gelan_t_3):
    target = build_model("gelan-t", num_classes=3)
    report = transfer(gelan_t_3, target)
    assert (report.loaded, report.reinitialised, report.fresh) == (len(target.state_dict()), 0, 0)
    assert report.sha256 == gelan_t_3.sha256
    assert same_outputs(target, gelan_t_3.model)


def test_another_class_count_reinitialises_the_class_prediction_layers(yolov9_t_80):
    target = build_model("yolov9-t", num_classes=4)
    report = transfer(yolov9_t_80, target)
    # 2 branches x 3 levels: the last conv of each class tower (weight, bias) -> 12 re-initialised.
    # The towers' width is max(64, min(2 nc, 128)): 128 for 80 classes, 64 for 4, so both Convs before
    # it differ too: conv.weight and 4 BatchNorm tensors each (its num_batches_tracked scalar fits):
    # 2 branches x 3 levels x 2 Convs x 5 = 60 left fresh.
    total = len(target.state_dict())
    assert (report.loaded, report.reinitialised, report.fresh) == (total - 72, 12, 60)
    # the prior-probability bias: about 5 objects per 640x640 image, spread over 4 classes
    for tower in (target.head.cv3, target.head.cv5):
        for level, stride in enumerate((8, 16, 32)):
            expected = math.log(5 / 4 / (640 / stride) ** 2)
            torch.testing.assert_close(tower[level][-1].bias, torch.full((4,), expected))
    # the box towers do not depend on the class count: they are the file's
    torch.testing.assert_close(target.head.cv4[0][-1].weight, yolov9_t_80.model.head.cv4[0][-1].weight)


def test_a_dual_model_from_a_single_branch_file_loads_its_main_branch_and_leaves_aux_fresh(gelan_t_3):
    target = build_model("yolov9-t", num_classes=3)
    report = transfer(gelan_t_3, target)
    # yolov9-t.yaml: layers 23-29 are the auxiliary neck, the head's cv2/cv3/dfl its auxiliary half
    aux = [
        k
        for k in target.state_dict()
        if any(k.startswith(f"layers.{i}.") for i in range(23, 30))
        or k.startswith(("layers.30.cv2.", "layers.30.cv3.", "layers.30.dfl."))
    ]
    assert (report.loaded, report.reinitialised, report.fresh) == (
        len(gelan_t_3.model.state_dict()),
        0,
        len(aux),
    )
    assert same_outputs(target, gelan_t_3.model)  # eval mode: the main branch, now gelan-t's network


def test_a_single_branch_model_from_a_dual_file_takes_the_main_branch(yolov9_t_80):
    target = build_model("gelan-t", num_classes=80)
    report = transfer(yolov9_t_80, target)
    assert (report.loaded, report.reinitialised, report.fresh) == (len(target.state_dict()), 0, 0)
    assert same_outputs(target, yolov9_t_80.model)


def test_another_model_size_is_an_error_not_a_fresh_start(yolov9_t_80):
    target = build_model("yolov9-s", num_classes=80)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(PretrainedError, match="yolov9-t.pt \\(yolov9-t\\) does not fit yolov9-s"):
        transfer(yolov9_t_80, target)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def small_checkpoint(model_weights: dict, ema_weights: dict) -> TrainingCheckpoint:
    return TrainingCheckpoint(
        model=model_weights,
        ema={"model": ema_weights, "updates": 1},
        epoch=1,
        step=1,
        config=Config(),
        best_map=0.0,
        model_name="gelan-t",
        num_classes=3,
        class_names=["a", "b", "c"],
    )


def test_a_project_checkpoint_gives_its_ema_weights(tmp_path):
    trained, averaged = build_model("gelan-t", 3), build_model("gelan-t", 3)
    with torch.no_grad():
        for p in averaged.parameters():
            p.add_(1.0)  # the EMA differs from the trained weights everywhere
    save_checkpoint(tmp_path, small_checkpoint(trained.state_dict(), averaged.state_dict()))
    source = load_source(tmp_path)
    assert source.kind == "checkpoint" and source.class_names == ("a", "b", "c")
    target = build_model("gelan-t", 3)
    transfer(source, target)
    assert all(torch.equal(v, averaged.state_dict()[k]) for k, v in target.state_dict().items())


def test_a_file_that_is_no_checkpoint_is_refused_with_both_reasons(tmp_path):
    junk = tmp_path / "weights.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(
        PretrainedError, match="neither a checkpoint of this project .* nor a readable reference"
    ):
        load_source(junk)


def test_an_mlflow_uri_never_reaches_a_worker_unresolved():
    with pytest.raises(PretrainedError, match="resolved to a file on the driver"):
        load_source("runs:/0123456789abcdef0123456789abcdef")


def test_a_relative_weights_path_is_made_absolute_and_uris_are_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config(None, ["model.weights=w/yolov9-t.pt"]).model.weights == str(tmp_path / "w/yolov9-t.pt")
    assert load_config(None, ["model.weights=models:/det@champion"]).model.weights == "models:/det@champion"


def engine_config(shards, *extra: str):
    return load_config(
        None,
        [
            "model.name=yolov9-t",
            f"data.root={shards}",
            "data.num_workers=0",
            "train.batch_size=2",
            "train.nominal_batch=2",
            "train.imgsz=64",
            "train.steps_per_epoch=3",
            "train.warmup_min_steps=0",
            "train.warmup_epochs=0",
            *extra,
        ],
    )


def batches(count: int) -> list:
    """``count`` batches of 2 random uint8 64x64 images, each with one box of class 0."""
    g = torch.Generator().manual_seed(0)
    targets = torch.tensor([[i, 0, 10.0, 10.0, 40.0, 40.0] for i in range(2)])
    return [
        (torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=g), targets) for _ in range(count)
    ]


def test_frozen_layers_keep_their_weights_and_batchnorm_statistics(tiny_shards):
    state = build_train_state(
        engine_config(tiny_shards, "model.freeze=5"), TrainingData.read(str(tiny_shards)), CPU
    )
    model = state.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimised = {id(p) for group in state.optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in optimised for p in model.layers[:5].parameters())
    train_one_epoch(state, batches(3))
    after = model.state_dict()
    frozen = [k for k in after if any(k.startswith(f"layers.{i}.") for i in range(5))]
    assert any(k.endswith("running_mean") for k in frozen)
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    # the first unfrozen layer (5: a RepNCSPELAN4) trained, and its BatchNorm statistics moved
    assert not torch.equal(before["layers.5.cv1.conv.weight"], after["layers.5.cv1.conv.weight"])
    assert not torch.equal(before["layers.5.cv1.bn.running_mean"], after["layers.5.cv1.bn.running_mean"])


def test_freezing_the_whole_model_is_an_error(tiny_shards):
    cfg = engine_config(tiny_shards, "model.freeze=31")  # yolov9-t has 31 layers, the head included
    with pytest.raises(PretrainedError, match="model.freeze is 31 but yolov9-t has 31 layers"):
        build_train_state(cfg, TrainingData.read(str(tiny_shards)), CPU)


def test_a_fresh_run_starts_from_model_weights_and_a_resumed_one_ignores_them(tiny_shards, tmp_path):
    data = TrainingData.read(str(tiny_shards))  # 4 synthetic classes
    cfg = engine_config(tiny_shards, f"model.weights={fixture_file('yolov9-t.pt')}")
    state = build_train_state(cfg, data, CPU)
    reference = load_source(fixture_file("yolov9-t.pt")).model
    torch.testing.assert_close(state.model.layers[1].conv.weight, reference.layers[1].conv.weight)
    # the EMA starts from the loaded weights, not from the random ones
    torch.testing.assert_close(state.ema.module.layers[1].conv.weight, reference.layers[1].conv.weight)

    scratch = build_train_state(engine_config(tiny_shards), data, CPU)
    save_checkpoint(tmp_path, scratch.checkpoint({}))
    resumed = build_train_state(cfg, data, CPU, resume=TrainingCheckpoint.from_state_dict(
        torch.load(tmp_path / "checkpoint.pt", weights_only=True)))  # fmt: skip
    torch.testing.assert_close(resumed.model.layers[1].conv.weight, scratch.model.layers[1].conv.weight)
