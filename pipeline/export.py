"""Deployable files of a pruned model: TorchScript (``torch.jit.trace``) and ONNX, each checked against
the PyTorch model before anyone gets to use it.

Both take and give what the pruned model does: float images ``(B, 3, S, S)`` in [0, 1] and the decoded
predictions ``(B, 4 + nc, A)``, boxes xywh in input pixels followed by class probabilities.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

# Has every op these models use (SiLU as Sigmoid*Mul, Resize, Softmax); onnxruntime >= 1.17 runs it.
OPSET = 18
# float32 kernels of onnxruntime and torch differ in summation order; outputs span hundreds of pixels.
RTOL, ATOL = 1e-4, 1e-3


class ExportError(RuntimeError):
    """An exported graph that cannot be written or does not reproduce the PyTorch model."""


def export_torchscript(model: nn.Module, path: str | Path, imgsz: int) -> Path:
    """Trace ``model`` (eval) on a ``(1, 3, imgsz, imgsz)`` input and save it to ``path``.

    The traced graph is fixed to the input size but not to the batch size (the model has no
    batch-dependent control flow).
    """
    model = model.eval()
    example = torch.rand(1, 3, imgsz, imgsz)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks turn into constants: intended
        traced = torch.jit.trace(model, example, check_trace=False)
    path = Path(path)
    traced.save(str(path))
    return path


def export_onnx(model: nn.Module, path: str | Path, imgsz: int) -> Path:
    """Write ``model`` (eval) as a single-file ONNX graph: input ``images`` ``(batch, 3, imgsz, imgsz)``
    float32, output ``predictions`` ``(batch, 4 + nc, A)``; the batch axis is dynamic."""
    model = model.eval()
    path = Path(path)
    example = torch.rand(1, 3, imgsz, imgsz)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                str(path),
                input_names=["images"],
                output_names=["predictions"],
                opset_version=OPSET,
                dynamo=False,
                dynamic_axes={"images": {0: "batch"}, "predictions": {0: "batch"}},
            )
    except Exception as e:  # the exporter raises a different type per unsupported construct
        raise ExportError(f"ONNX export of {type(model).__name__} failed: {type(e).__name__}: {e}") from e
    return path


def onnx_session(path: str | Path):
    """A CPU onnxruntime session of the ONNX file at ``path``."""
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def check_onnx(model: nn.Module, path: str | Path, images: torch.Tensor) -> float:
    """Run ``images`` (B, 3, S, S) float in [0, 1] through ``model`` and through the ONNX file with
    onnxruntime on CPU; raise ExportError unless they agree within rtol 1e-4 / atol 1e-3.

    Returns the largest absolute difference.
    """
    import onnx

    onnx.checker.check_model(str(path))
    with torch.no_grad():
        expected = model.eval()(images.float()).numpy()
    got = onnx_session(path).run(None, {"images": images.float().numpy()})[0]
    if got.shape != expected.shape:
        raise ExportError(f"ONNX output shape {got.shape} differs from the PyTorch model's {expected.shape}")
    diff = float(np.abs(got - expected).max(initial=0.0))
    if not np.allclose(got, expected, rtol=RTOL, atol=ATOL):
        raise ExportError(
            f"ONNX output differs from the PyTorch model by up to {diff:.3g} (rtol {RTOL}, atol {ATOL})"
        )
    return diff


def check_torchscript(model: nn.Module, path: str | Path, images: torch.Tensor) -> float:
    """Like :func:`check_onnx`, for a TorchScript file (loaded on CPU). Returns the largest difference."""
    traced = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        expected, got = model.eval()(images.float()), traced(images.float())
    if got.shape != expected.shape:
        raise ExportError(f"TorchScript output shape {tuple(got.shape)} differs from {tuple(expected.shape)}")
    diff = float((got - expected).abs().max())
    if not torch.allclose(got, expected, rtol=RTOL, atol=ATOL):
        raise ExportError(f"TorchScript output differs from the PyTorch model by up to {diff:.3g}")
    return diff
