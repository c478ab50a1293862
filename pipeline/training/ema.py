"""Exponential moving average of model weights, as in the YOLOv9 reference recipe."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


class ModelEMA:
    """EMA of a model's parameters and buffers with a ramped decay.

    decay(n) = decay * (1 - exp(-n / tau)) after n updates, so early weights are forgotten fast.
    The copy lives on the model's device and stays in eval mode.
    """

    def __init__(
        self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0
    ) -> None:
        self.module = copy.deepcopy(unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, updates

    def current_decay(self) -> float:
        return self.decay * (1 - math.exp(-self.updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """``ema = d * ema + (1 - d) * model`` for floating tensors, a copy for the others (counters).

        Each side is one ``torch._foreach_*`` call over all tensors: a few kernels per update on a GPU
        instead of two per tensor (hundreds for yolov9-c)."""
        self.updates += 1
        d = self.current_decay()
        source = unwrap(model).state_dict()
        blend, blend_from, copy_to, copy_from = [], [], [], []
        for name, value in self.module.state_dict().items():
            floating = value.dtype.is_floating_point
            (blend if floating else copy_to).append(value)
            (blend_from if floating else copy_from).append(source[name])
        if blend:
            torch._foreach_mul_(blend, d)
            torch._foreach_add_(blend, blend_from, alpha=1 - d)
        if copy_to:
            torch._foreach_copy_(copy_to, copy_from)

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.updates = int(state["updates"])


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile`` and DistributedDataParallel wrappers (or the model itself)."""
    while True:
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model
