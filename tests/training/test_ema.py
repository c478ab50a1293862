"""ModelEMA: ramped decay, buffers, and a state that survives a checkpoint round trip."""

import math

import pytest
import torch
from torch import nn

from pipeline.training.ema import ModelEMA


def test_decay_ramps_from_zero_towards_its_nominal_value():
    ema = ModelEMA(nn.Linear(1, 1), decay=0.9999, tau=2000)
    assert ema.current_decay() == 0.0
    ema.updates = 2000
    assert ema.current_decay() == pytest.approx(0.9999 * (1 - math.exp(-1)))


def test_update_blends_weights_with_the_current_decay():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = ModelEMA(model, decay=0.5, tau=1.0)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    d = 0.5 * (1 - math.exp(-1))
    assert ema.module.weight.item() == pytest.approx(1 - d)


def test_integer_buffers_are_copied_not_averaged():
    model = nn.BatchNorm2d(2)
    ema = ModelEMA(model)
    model.num_batches_tracked.fill_(7)
    ema.update(model)
    assert ema.module.num_batches_tracked.item() == 7


def test_state_round_trip_restores_weights_and_update_count():
    model = nn.Linear(2, 2)
    ema = ModelEMA(model, tau=10.0)
    for _ in range(3):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update(model)
    restored = ModelEMA(nn.Linear(2, 2), tau=10.0)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 3
    assert torch.equal(restored.module.weight, ema.module.weight)
