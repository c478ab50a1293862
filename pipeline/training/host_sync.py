"""Counting the calls in a stretch of code that make the host wait for an accelerator.

On a GPU, ``torch.cuda.set_sync_debug_mode("warn")`` names every synchronisation as it happens. The
counter here measures the same thing on any device, the CPU included: it records each call, through
PyTorch's ``__torch_function__`` protocol, of an operation that copies a value or a data-dependent size
back to the host (``.item()``, ``bool(t)``, ``.tolist()``, ``nonzero()``, boolean-mask indexing, ...).
A train step that makes none of these calls, save the ones it means to, runs ahead of the GPU.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

# operations whose result size or value must be read from the device before the host can go on
_READS = {
    torch.Tensor.item: "item",
    torch.Tensor.tolist: "tolist",
    torch.Tensor.__bool__: "__bool__",
    torch.Tensor.__int__: "__int__",
    torch.Tensor.__float__: "__float__",
    torch.Tensor.__index__: "__index__",
    torch.Tensor.numpy: "numpy",
    torch.Tensor.nonzero: "nonzero",
    torch.nonzero: "nonzero",
    torch.Tensor.masked_select: "masked_select",
    torch.masked_select: "masked_select",
    torch.Tensor.unique: "unique",
    torch.unique: "unique",
    torch.argwhere: "argwhere",
}


def _has_bool_index(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


_TORCH = str(Path(torch.__file__).parent)


def _call_site() -> str:
    """``function (file:line)`` of the innermost caller outside torch and this module."""
    frame = sys._getframe(2)
    while frame is not None and (
        frame.f_code.co_filename.startswith(_TORCH) or frame.f_code.co_filename == __file__
    ):
        frame = frame.f_back
    if frame is None:
        return "?"
    return f"{frame.f_code.co_name} ({Path(frame.f_code.co_filename).name}:{frame.f_lineno})"


class HostSyncCounter(TorchFunctionMode):
    """Context manager: ``counts`` maps each host-reading operation to the number of calls inside,
    ``sites`` each ``(operation, call site)`` to its count (the call site is the innermost caller
    outside torch: ``function (file:line)``).

    Only reads of tensors that live on ``device`` count (CPU-side bookkeeping never waits for it); with
    ``device`` a CPU device, every call counts, which is how a CPU run stands in for a GPU one.
    """

    def __init__(self, device: torch.device | str) -> None:
        super().__init__()
        self.device = torch.device(device)
        self.counts: Counter[str] = Counter()
        self.sites: Counter[tuple[str, str]] = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 -- torch's protocol
        kwargs = kwargs or {}
        tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if tensor is not None and tensor.device.type == self.device.type:
            name = _READS.get(func)
            if name is None and func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):
                name = "bool_mask_index" if _has_bool_index(args[1]) else None
            if name is None and func is torch.Tensor.repeat_interleave and "output_size" not in kwargs:
                name = (
                    "repeat_interleave"
                    if isinstance(args[1] if len(args) > 1 else None, torch.Tensor)
                    else None
                )
            if name is not None:
                self.counts[name] += 1
                self.sites[name, _call_site()] += 1
        return func(*args, **kwargs)
