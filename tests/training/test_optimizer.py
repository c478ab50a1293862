"""The reference optimisation recipe: parameter groups, accumulation, warmup, LR decay."""

import pytest
import torch

from pipeline.training.optimizer import Schedule, accumulation_steps, build_sgd
from yolov9 import build_model


def schedule(**overrides) -> Schedule:
    values = dict(
        lr0=0.01,
        lrf=0.01,
        epochs=10,
        steps_per_epoch=50,
        momentum=0.937,
        warmup_epochs=3.0,
        warmup_min_steps=100,
        warmup_bias_lr=0.1,
        warmup_momentum=0.8,
        cosine=False,
    )
    values.update(overrides)
    return Schedule(**values)


@pytest.mark.parametrize(("global_batch", "expected"), [(16, 4), (32, 2), (64, 1), (128, 1), (24, 3)])
def test_accumulation_reaches_the_nominal_batch(global_batch, expected):
    assert accumulation_steps(64, global_batch) == expected


def test_sgd_groups_separate_biases_weights_and_norm_weights():
    model = build_model("gelan-t", num_classes=2)
    opt = build_sgd(model, lr=0.01, momentum=0.937, weight_decay=5e-4)
    biases, weights, norms = (g["params"] for g in opt.param_groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 5e-4, 0.0]
    assert all(p.ndim == 1 for p in biases + norms)
    assert all(p.ndim == 4 for p in weights)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(biases) + len(weights) + len(norms) == len(trainable)
    assert opt.defaults["nesterov"] is True


def test_frozen_dfl_weights_are_not_optimised():
    model = build_model("gelan-t", num_classes=2)
    opt = build_sgd(model, 0.01, 0.9, 0.0)
    in_groups = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.head.dfl.conv.weight) not in in_groups


def test_warmup_lasts_at_least_the_minimum_steps():
    assert schedule(steps_per_epoch=10).warmup_steps == 100
    assert schedule(steps_per_epoch=50).warmup_steps == 150


def test_warmup_starts_bias_lr_high_and_other_lr_at_zero():
    s = schedule()
    assert s.lr(0, 0, 0) == pytest.approx(0.1)
    assert s.lr(1, 0, 0) == 0.0
    assert s.momentum_at(0) == pytest.approx(0.8)


def test_warmup_midpoint_interpolates_linearly():
    s = schedule()  # 150 warmup steps, epoch 1 target lr = 0.01 * (1 - 0.1 * 0.99)
    target = 0.01 * ((1 - 1 / 10) * 0.99 + 0.01)
    assert s.lr(1, 1, 75) == pytest.approx(target / 2)
    assert s.lr(0, 1, 75) == pytest.approx((0.1 + target) / 2)
    assert s.momentum_at(75) == pytest.approx((0.8 + 0.937) / 2)


def test_linear_decay_reaches_lrf_times_lr0_at_the_end():
    s = schedule()
    assert s.lr(1, 0, 1000) == pytest.approx(0.01)
    assert s.lr(1, 5, 1000) == pytest.approx(0.01 * (0.5 * 0.99 + 0.01))
    assert s.lr(1, 10, 1000) == pytest.approx(0.01 * 0.01)


def test_cosine_decay_is_half_way_at_mid_training():
    s = schedule(cosine=True)
    assert s.lr(1, 5, 1000) == pytest.approx(0.01 * (1 + 0.01) / 2)


def test_accumulation_ramps_up_during_warmup():
    s = schedule()
    assert s.accumulate_at(0, 64, 16) == 1
    assert s.accumulate_at(150, 64, 16) == 4
    assert 1 < s.accumulate_at(100, 64, 16) <= 4


def test_apply_sets_every_group():
    model = build_model("gelan-t", num_classes=1)
    opt = build_sgd(model, 0.01, 0.937, 5e-4)
    schedule().apply(opt, epoch=0, step=0)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.1), 0.0, 0.0]
    assert all(g["momentum"] == pytest.approx(0.8) for g in opt.param_groups)


def test_weight_decay_only_shrinks_the_decayed_group():
    w = torch.nn.Parameter(torch.ones(2, 2, 1, 1))
    conv = torch.nn.Conv2d(2, 2, 1)
    conv.weight = w
    opt = build_sgd(conv, lr=1.0, momentum=0.5, weight_decay=0.1)
    conv.weight.grad = torch.zeros_like(w)
    conv.bias.grad = torch.zeros_like(conv.bias)
    bias_before = conv.bias.detach().clone()
    opt.step()
    # zero gradient: d = 0.1 * w = 0.1; Nesterov step = d + 0.5 * d = 0.15
    assert torch.allclose(conv.weight, torch.full_like(w, 0.85))
    assert torch.equal(conv.bias.detach(), bias_before)
