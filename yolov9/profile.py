"""Model size figures: parameter count and convolution FLOPs."""

from __future__ import annotations

import torch
from torch import nn


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements, frozen ones (the DFL integral weights) included."""
    return sum(p.numel() for p in model.parameters())


def gflops(model: nn.Module, height: int = 640, width: int = 640) -> float:
    """GFLOPs (2 x multiply-accumulates) of one forward at ``height`` x ``width``.

    Counts the kernel MACs of Conv2d layers, where nearly all the work of these models is, the
    way the reference figures do: biases, pooling, activations and upsampling count as zero.
    """
    macs = 0

    def count(m: nn.Conv2d, _inputs: tuple, out: torch.Tensor) -> None:
        nonlocal macs
        macs += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            p = next(model.parameters())
            model(torch.zeros(1, 3, height, width, device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return 2 * macs / 1e9
