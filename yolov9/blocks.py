"""GELAN building blocks of YOLOv9 (Wang et al., 2024), in the reference's semantics.

Every block takes NCHW float tensors. Channel arguments follow the paper's configs:
``c1`` input channels, ``c2`` output channels, further ``c*`` hidden widths.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-3
BN_MOMENTUM = 0.03


def autopad(k: int, p: int | None = None, d: int = 1) -> int:
    """Padding that keeps the spatial size for stride 1 ('same' padding)."""
    if p is not None:
        return p
    k = d * (k - 1) + 1 if d > 1 else k
    return k // 2


class Conv(nn.Module):
    """Conv2d (no bias) + BatchNorm + SiLU; after :meth:`fuse`, Conv2d with bias + SiLU."""

    def __init__(
        self,
        c1: int,
        c2: int,
        k: int = 1,
        s: int = 1,
        p: int | None = None,
        g: int = 1,
        d: int = 1,
        act: bool = True,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn: nn.BatchNorm2d | None = nn.BatchNorm2d(c2, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.act(x)

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold BatchNorm (eval statistics) into the convolution."""
        if self.bn is None:
            return
        weight, bias = fold_batchnorm(self.conv.weight, self.bn)
        conv = nn.Conv2d(
            self.conv.in_channels,
            self.conv.out_channels,
            self.conv.kernel_size,
            self.conv.stride,
            self.conv.padding,
            self.conv.dilation,
            self.conv.groups,
            bias=True,
        ).to(weight.device, weight.dtype)
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
        self.conv = conv
        self.bn = None


def fold_batchnorm(weight: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight (c2, c1/g, k, k) and bias (c2,) of a bias-free conv followed by ``bn`` in eval mode."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return weight * scale.view(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


class RepConvN(nn.Module):
    """Re-parameterisable conv: 3x3+BN and 1x1+BN summed, then SiLU (no identity branch)."""

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 1, g: int = 1) -> None:
        super().__init__()
        if k != 3:
            raise ValueError(f"RepConvN needs a 3x3 kernel, got k={k}")
        self.conv1 = Conv(c1, c2, 3, s, 1, g=g, act=False)
        self.conv2 = Conv(c1, c2, 1, s, 0, g=g, act=False)
        self.act = nn.SiLU()
        self.fused: nn.Conv2d | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.act(self.fused(x))
        return self.act(self.conv1(x) + self.conv2(x))

    @torch.no_grad()
    def fuse(self) -> None:
        """Merge both branches into one 3x3 conv with bias (exact in eval mode)."""
        if self.fused is not None:
            return
        w3, b3 = fold_batchnorm(self.conv1.conv.weight, self.conv1.bn)
        w1, b1 = fold_batchnorm(self.conv2.conv.weight, self.conv2.bn)
        src = self.conv1.conv
        fused = nn.Conv2d(
            src.in_channels, src.out_channels, 3, src.stride, 1, groups=src.groups, bias=True
        ).to(w3.device, w3.dtype)
        fused.weight.copy_(w3 + F.pad(w1, [1, 1, 1, 1]))
        fused.bias.copy_(b3 + b1)
        self.fused = fused
        del self.conv1, self.conv2


class RepNBottleneck(nn.Module):
    """RepConvN 3x3 then Conv 3x3, with a residual when the widths match."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, g: int = 1, e: float = 0.5) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = RepConvN(c1, c_, 3, 1)
        self.cv2 = Conv(c_, c2, 3, 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class RepNCSP(nn.Module):
    """CSP block whose bottlenecks are RepNBottlenecks."""

    def __init__(
        self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5
    ) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(RepNBottleneck(c_, c_, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class RepNCSPELAN4(nn.Module):
    """The GELAN block: split, two RepNCSP+Conv stages, concatenate all four parts, 1x1 conv.

    Args: c1 in, c2 out, c3 width of the first 1x1 conv (split in halves), c4 stage width,
    c5 bottlenecks per RepNCSP.
    """

    def __init__(self, c1: int, c2: int, c3: int, c4: int, c5: int = 1) -> None:
        super().__init__()
        self.cv1 = Conv(c1, c3, 1, 1)
        self.cv2 = nn.Sequential(RepNCSP(c3 // 2, c4, c5), Conv(c4, c4, 3, 1))
        self.cv3 = nn.Sequential(RepNCSP(c4, c4, c5), Conv(c4, c4, 3, 1))
        self.cv4 = Conv(c3 + 2 * c4, c2, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.append(self.cv2(y[-1]))
        y.append(self.cv3(y[-1]))
        return self.cv4(torch.cat(y, 1))


class ELAN1(nn.Module):
    """Light ELAN block of the tiny/small models: plain 3x3 Convs instead of RepNCSP stages."""

    def __init__(self, c1: int, c2: int, c3: int, c4: int) -> None:
        super().__init__()
        self.cv1 = Conv(c1, c3, 1, 1)
        self.cv2 = Conv(c3 // 2, c4, 3, 1)
        self.cv3 = Conv(c4, c4, 3, 1)
        self.cv4 = Conv(c3 + 2 * c4, c2, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.append(self.cv2(y[-1]))
        y.append(self.cv3(y[-1]))
        return self.cv4(torch.cat(y, 1))


def _avg_pool_2x2_s1(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 2, 1, 0, False, True)


class AConv(nn.Module):
    """Downsample by 2: 2x2 average pool (stride 1), then 3x3 stride-2 Conv."""

    def __init__(self, c1: int, c2: int) -> None:
        super().__init__()
        self.cv1 = Conv(c1, c2, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv1(_avg_pool_2x2_s1(x))


class ADown(nn.Module):
    """Downsample by 2: average pool, then half the channels by 3x3 s2 Conv, half by max-pool + 1x1."""

    def __init__(self, c1: int, c2: int) -> None:
        super().__init__()
        self.c = c2 // 2
        self.cv1 = Conv(c1 // 2, self.c, 3, 2, 1)
        self.cv2 = Conv(c1 // 2, self.c, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = _avg_pool_2x2_s1(x).chunk(2, 1)
        return torch.cat((self.cv1(x1), self.cv2(F.max_pool2d(x2, 3, 2, 1))), 1)


class SPPELAN(nn.Module):
    """Spatial pyramid pooling as ELAN: 1x1 conv, three chained 5x5 max-pools, concat, 1x1 conv."""

    def __init__(self, c1: int, c2: int, c3: int, k: int = 5) -> None:
        super().__init__()
        self.cv1 = Conv(c1, c3, 1, 1)
        self.pool = nn.MaxPool2d(k, 1, k // 2)
        self.cv5 = Conv(4 * c3, c2, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        for _ in range(3):
            y.append(self.pool(y[-1]))
        return self.cv5(torch.cat(y, 1))


class CBLinear(nn.Module):
    """1x1 conv with bias whose output is split into the widths ``c2s`` (PGI routing)."""

    def __init__(self, c1: int, c2s: Sequence[int]) -> None:
        super().__init__()
        self.c2s = list(c2s)
        self.conv = nn.Conv2d(c1, sum(self.c2s), 1, 1, 0, bias=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.conv(x).split(self.c2s, dim=1)


class CBFuse(nn.Module):
    """Sum element ``idx[i]`` of each CBLinear output, nearest-upsampled to the last input's size."""

    def __init__(self, idx: Sequence[int]) -> None:
        super().__init__()
        self.idx = list(idx)

    def forward(self, xs: list) -> torch.Tensor:
        target = xs[-1]
        out = target
        for i, x in enumerate(xs[:-1]):
            out = out + F.interpolate(x[self.idx[i]], size=target.shape[2:], mode="nearest")
        return out


class Silence(nn.Module):
    """Identity: layer 0 of the dual models, so later layers can take the input image by index."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Concat(nn.Module):
    """Concatenate a list of tensors along ``dimension``."""

    def __init__(self, dimension: int = 1) -> None:
        super().__init__()
        self.d = dimension

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(xs, self.d)


class Upsample(nn.Upsample):
    """Nearest-neighbour upsampling (``nn.Upsample``) under the name the configs use."""
