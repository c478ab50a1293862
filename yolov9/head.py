"""Anchor-free decoupled detection heads: DDetect (one branch) and DualDDetect (PGI aux + main).

A head map is ``(B, 4 * reg_max + nc, H, W)``: the first ``4 * reg_max`` channels are the
distance distributions of the left, top, right, bottom sides (side-major), then the class logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from yolov9.blocks import Conv

REG_MAX = 16


def make_divisible(x: float, divisor: int) -> int:
    """Smallest multiple of ``divisor`` that is >= ``x``."""
    return int(math.ceil(x / divisor) * divisor)


class DFL(nn.Module):
    """Distribution focal loss integral: expectation of a softmax over ``c1`` bins, per box side."""

    def __init__(self, c1: int = REG_MAX) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(c1, dtype=torch.float).view(1, c1, 1, 1)
        self.c1 = c1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 4*c1, A) logits -> (B, 4, A) distances in grid units."""
        b, _, a = x.shape
        return self.conv(x.view(b, 4, self.c1, a).transpose(2, 1).softmax(1)).view(b, 4, a)


def _branch(ch: Sequence[int], nc: int, reg_max: int) -> tuple[nn.ModuleList, nn.ModuleList]:
    """Box and class towers of one branch for input widths ``ch``."""
    c_box = make_divisible(max(ch[0] // 4, reg_max * 4, 16), 4)
    c_cls = max(ch[0], min(nc * 2, 128))
    box = nn.ModuleList(
        nn.Sequential(
            Conv(c, c_box, 3), Conv(c_box, c_box, 3, g=4), nn.Conv2d(c_box, 4 * reg_max, 1, groups=4)
        )
        for c in ch
    )
    cls = nn.ModuleList(
        nn.Sequential(Conv(c, c_cls, 3), Conv(c_cls, c_cls, 3), nn.Conv2d(c_cls, nc, 1)) for c in ch
    )
    return box, cls


def anchor_grid(
    maps: Sequence[torch.Tensor], strides: Sequence[float] | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell-centre anchors ``(A, 2)`` in grid units and the stride ``(A, 1)`` of each anchor."""
    points, stride_of = [], []
    for m, s in zip(maps, strides, strict=True):
        h, w = m.shape[2:]
        ys = torch.arange(h, device=m.device, dtype=m.dtype) + 0.5
        xs = torch.arange(w, device=m.device, dtype=m.dtype) + 0.5
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack((gx, gy), -1).view(-1, 2))
        stride_of.append(torch.full((h * w, 1), float(s), device=m.device, dtype=m.dtype))
    return torch.cat(points), torch.cat(stride_of)


def decode(maps: Sequence[torch.Tensor], strides: torch.Tensor, dfl: DFL, nc: int) -> torch.Tensor:
    """Head maps -> ``(B, 4 + nc, A)``: boxes xywh in input pixels, then class probabilities."""
    b = maps[0].shape[0]
    flat = torch.cat([m.view(b, m.shape[1], -1) for m in maps], 2)
    box, cls = flat.split((4 * dfl.c1, nc), 1)
    anchors, stride = anchor_grid(maps, strides)
    lt, rb = dfl(box).chunk(2, 1)
    centre = anchors.T.unsqueeze(0)
    x1y1, x2y2 = centre - lt, centre + rb
    xywh = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * stride.T.unsqueeze(0)
    return torch.cat((xywh, cls.sigmoid()), 1)


def _init_biases(box: nn.ModuleList, cls: nn.ModuleList, strides: torch.Tensor, nc: int) -> None:
    """Box bias 1.0; class bias so that about 5 objects per 640x640 image start as positives."""
    for b, c, s in zip(box, cls, strides.tolist(), strict=True):
        b[-1].bias.data[:] = 1.0
        c[-1].bias.data[:nc] = math.log(5 / nc / (640 / s) ** 2)


class DDetect(nn.Module):
    """Single-branch head. Train mode: list of maps per level. Eval mode: decoded ``(B, 4+nc, A)``."""

    dual = False

    def __init__(self, nc: int, ch: Sequence[int], reg_max: int = REG_MAX) -> None:
        super().__init__()
        self.nc, self.nl, self.reg_max = nc, len(ch), reg_max
        self.no = nc + 4 * reg_max
        self.register_buffer("stride", torch.zeros(self.nl), persistent=False)
        self.cv2, self.cv3 = _branch(ch, nc, reg_max)
        self.dfl = DFL(reg_max)

    def init_biases(self) -> None:
        _init_biases(self.cv2, self.cv3, self.stride, self.nc)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor] | torch.Tensor:
        maps = [torch.cat((self.cv2[i](xs[i]), self.cv3[i](xs[i])), 1) for i in range(self.nl)]
        return maps if self.training else decode(maps, self.stride, self.dfl, self.nc)


class DualDDetect(nn.Module):
    """PGI head: inputs are the aux levels then the main levels.

    Train mode: ``[aux_maps, main_maps]``. Eval mode: decoded main-branch ``(B, 4+nc, A)`` only.
    """

    dual = True

    def __init__(self, nc: int, ch: Sequence[int], reg_max: int = REG_MAX) -> None:
        super().__init__()
        self.nl = len(ch) // 2
        self.nc, self.reg_max = nc, reg_max
        self.no = nc + 4 * reg_max
        self.register_buffer("stride", torch.zeros(self.nl), persistent=False)
        self.cv2, self.cv3 = _branch(ch[: self.nl], nc, reg_max)
        self.cv4, self.cv5 = _branch(ch[self.nl :], nc, reg_max)
        self.dfl = DFL(reg_max)
        self.dfl2 = DFL(reg_max)

    def init_biases(self) -> None:
        _init_biases(self.cv2, self.cv3, self.stride, self.nc)
        _init_biases(self.cv4, self.cv5, self.stride, self.nc)

    def forward(self, xs: list[torch.Tensor]) -> list[list[torch.Tensor]] | torch.Tensor:
        n = self.nl
        main = [torch.cat((self.cv4[i](xs[n + i]), self.cv5[i](xs[n + i])), 1) for i in range(n)]
        if not self.training:
            return decode(main, self.stride, self.dfl2, self.nc)
        aux = [torch.cat((self.cv2[i](xs[i]), self.cv3[i](xs[i])), 1) for i in range(n)]
        return [aux, main]

    def main_half(self) -> DDetect:
        """A DDetect that shares this head's main-branch modules (used by pruning)."""
        ch = [seq[0].conv.in_channels for seq in self.cv4]
        head = DDetect(self.nc, ch, self.reg_max)
        head.cv2, head.cv3, head.dfl = self.cv4, self.cv5, self.dfl2
        head.stride = self.stride.clone()
        return head
