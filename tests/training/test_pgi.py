"""PGI gradient diagnostics: the numbers against hand-computed cases, the stages of the real models, and
a run with diagnostics ends exactly where the same run without them ends."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.training import TrainingData, build_train_state, run_epoch
from pipeline.training.pgi_diagnostics import gradient_stats, pgi_diagnostics, plot_pgi
from tests.training.test_engine import config as engine_config

CPU = torch.device("cpu")
T_STAGES = ["backbone_p1", "backbone_p2", "backbone_p3", "backbone_p4", "backbone_p5", "neck_p3", "neck_p4",
            "neck_p5"]  # fmt: skip


def test_two_branches_on_different_coordinates_give_hand_computed_norms_ratio_and_cosine():
    p = nn.Parameter(torch.tensor([1.0, 2.0]))
    q = nn.Parameter(torch.tensor([5.0]))
    main = 3 * p[0] + 0 * q.sum()  # d/dp = [3, 0], d/dq = [0]
    aux = 4 * p[1] + 2 * q.sum()  # d/dp = [0, 4], d/dq = [2]
    stats = gradient_stats(main, aux, {"a": [p], "b": [q]})
    assert stats["pgi/a/main_grad_norm"] == pytest.approx(3.0)
    assert stats["pgi/a/aux_grad_norm"] == pytest.approx(4.0)
    assert stats["pgi/a/aux_main_ratio"] == pytest.approx(4 / 3)
    assert stats["pgi/a/cosine"] == pytest.approx(0.0)  # orthogonal gradients
    assert stats["pgi/a/main_zero_frac"] == pytest.approx(0.5)  # p[1] gets nothing from the main loss
    # the main loss sends nothing into stage b: its ratio and cosine are undefined and left out
    assert stats["pgi/b/main_grad_norm"] == 0.0 and stats["pgi/b/main_zero_frac"] == 1.0
    assert stats["pgi/b/aux_grad_norm"] == pytest.approx(2.0)
    assert "pgi/b/aux_main_ratio" not in stats and "pgi/b/cosine" not in stats


def test_identical_gradients_have_cosine_one_and_opposite_ones_minus_one():
    p = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    w = torch.tensor([0.3, -1.0, 2.0])
    same = gradient_stats((w * p).sum(), (2 * w * p).sum(), {"s": [p]})
    assert same["pgi/s/cosine"] == pytest.approx(1.0) and same["pgi/s/aux_main_ratio"] == pytest.approx(2.0)
    opposite = gradient_stats((w * p).sum(), -(w * p).sum(), {"s": [p]})
    assert opposite["pgi/s/cosine"] == pytest.approx(-1.0)


def test_a_branch_whose_loss_is_zero_sends_zero_gradient():
    p = nn.Parameter(torch.tensor([1.0, 2.0]))
    stats = gradient_stats((p**2).sum(), 0.0 * p.sum(), {"s": [p]})
    assert stats["pgi/s/main_grad_norm"] == pytest.approx(float(np.hypot(2.0, 4.0)))
    assert stats["pgi/s/aux_grad_norm"] == 0.0 and stats["pgi/s/aux_main_ratio"] == 0.0
    assert "pgi/s/cosine" not in stats


@pytest.mark.parametrize(
    "epoch",
    [
        {"epoch": 1, "pgi/neck_p3/main_grad_norm": 2.0, "pgi/neck_p3/main_zero_frac": 0.1},  # single branch
        {"epoch": 1, "pgi/backbone_p3/main_grad_norm": 2.0, "pgi/backbone_p3/aux_grad_norm": 0.0,
         "pgi/backbone_p3/aux_main_ratio": 0.0},  # aux weight 0: only zeros where the axes are logarithmic
    ],
)  # fmt: skip
def test_the_plot_draws_runs_without_an_aux_gradient(epoch, tmp_path):
    assert plot_pgi([epoch], tmp_path / "pgi.png").stat().st_size > 10_000


def config(shards, *extra: str):
    """The engine tests' tiny config with a batch of 4 (the diagnostics use half a batch)."""
    return engine_config(shards, "train.batch_size=4", *extra)


def test_yolov9_t_with_aux_weight_0_gets_no_aux_gradient_in_any_stage(tiny_shards):
    state = build_train_state(
        config(tiny_shards, "loss.aux_weight=0"), TrainingData.read(str(tiny_shards)), CPU
    )
    stats = pgi_diagnostics(state)
    assert sorted({k.split("/")[1] for k in stats}) == T_STAGES
    for stage in T_STAGES:
        assert stats[f"pgi/{stage}/main_grad_norm"] > 0
        assert stats[f"pgi/{stage}/aux_grad_norm"] == 0.0


def test_the_aux_branch_reaches_the_backbone_and_not_the_main_neck(tiny_shards):
    state = build_train_state(config(tiny_shards), TrainingData.read(str(tiny_shards)), CPU)
    stats = pgi_diagnostics(state)
    for stage in T_STAGES[:5]:  # yolov9-t's aux neck reads the backbone's P3-P5 outputs
        assert stats[f"pgi/{stage}/aux_grad_norm"] > 0 and -1 <= stats[f"pgi/{stage}/cosine"] <= 1
    for stage in T_STAGES[5:]:
        assert stats[f"pgi/{stage}/aux_grad_norm"] == 0.0


def test_a_single_branch_model_has_main_statistics_only(tiny_shards):
    state = build_train_state(
        config(tiny_shards, "model.name=gelan-t"), TrainingData.read(str(tiny_shards)), CPU
    )
    stats = pgi_diagnostics(state)
    assert sorted({k.split("/")[1] for k in stats}) == T_STAGES
    assert {k.split("/")[2] for k in stats} == {"main_grad_norm", "main_zero_frac"}


@pytest.mark.slow
def test_training_with_diagnostics_ends_with_the_same_weights_optimizer_and_rng_as_without(
    tiny_shards, tmp_path
):
    data = TrainingData.read(str(tiny_shards))
    ends = []
    for every in (0, 1):
        torch.manual_seed(123)
        random.seed(123)
        np.random.seed(123)
        cfg = config(tiny_shards, f"train.pgi_diagnostics_every={every}", "train.val_every=2",
                     "train.steps_per_epoch=1")  # fmt: skip
        state = build_train_state(cfg, data, CPU)
        history = [run_epoch(state), run_epoch(state)]
        rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1])
        ends.append((state, history, rng))
    (plain, plain_history, plain_rng), (diagnosed, history, rng) = ends
    assert not any(k.startswith("pgi/") for h in plain_history for k in h)
    assert all(f"pgi/{s}/cosine" in h for h in history for s in T_STAGES[:5])  # after epochs 1 and 2
    for a, b in [(plain.model, diagnosed.model), (plain.ema.module, diagnosed.ema.module)]:
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(x, y), name
    momentum = [s["momentum_buffer"] for s in plain.optimizer.state_dict()["state"].values()]
    again = [s["momentum_buffer"] for s in diagnosed.optimizer.state_dict()["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(momentum, again, strict=True))
    assert (
        torch.equal(plain_rng[0], rng[0]) and plain_rng[1] == rng[1] and np.array_equal(plain_rng[2], rng[2])
    )
    assert plain_history[-1]["val/map50_95"] == history[-1]["val/map50_95"]
    picture = plot_pgi(diagnosed.history, tmp_path / "pgi.png")
    assert Path(picture).stat().st_size > 10_000
