"""Deployable files of a pruned model: TorchScript (``torch.jit.trace``) and ONNX, each checked against
the PyTorch model before anyone gets to use it.

Both take and give what the pruned model does: float images ``(B, 3, S, S)`` in [0, 1] and the decoded
predictions ``(B, 4 + nc, A)``, boxes xywh in input pixels followed by class probabilities.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import PipelineError
from yolov9.postprocess import non_max_suppression, pairwise_iou

# Has every op these models use (SiLU as Sigmoid*Mul, Resize, Softmax); onnxruntime >= 1.17 runs it.
OPSET = 18

# What an export check allows. Two correct float32 runtimes sum in different orders: onnxruntime 1.32 and
# torch 2.13 differ by ~4e-3 px on boxes at 160 px (2.7e-5 of the side) and by ~1e-6 on probabilities.
# The bugs an export can have move far more: a wrong anchor offset shifts boxes by half a stride (>= 4 px),
# a missing sigmoid turns probabilities into logits, the auxiliary branch gives other boxes and scores.
# Raw outputs: boxes within 5e-4 of the input side (0.08 px at 160, 0.32 px at 640; every anchor counts,
# also the flat, noisier distributions of background anchors), probabilities within 1e-3 absolute.
BOX_RTOL = 5e-4
SCORE_ATOL = 1e-3
# What users consume, the detections after NMS: the same boxes (IoU > 0.99 or every side within 0.5 px),
# the same classes, scores within SCORE_ATOL. A detection within SCORE_ATOL of the confidence threshold may
# fall on either side of it in a correct export and is not required to have a counterpart.
DETECTION_MIN_IOU = 0.99
DETECTION_MAX_PX = 0.5
DETECTION_CONF, DETECTION_IOU = 0.25, 0.45


class ExportError(PipelineError, RuntimeError):
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


@dataclass(frozen=True)
class ExportCheck:
    """How close an exported graph came to the PyTorch model on the probe images."""

    box_diff_px: float  # largest |box coordinate difference| over all anchors, input pixels
    score_diff: float  # largest |class probability difference| over all anchors
    detections: int  # post-NMS detections that were matched one to one (both directions)


def compare_predictions(expected: torch.Tensor, got: torch.Tensor, imgsz: int) -> ExportCheck:
    """Raise ExportError unless ``got`` reproduces ``expected`` (both eval outputs ``(B, 4 + nc, A)``:
    boxes xywh in pixels of an ``imgsz`` input, then class probabilities), raw and after NMS."""
    if got.shape != expected.shape:
        raise ExportError(
            f"output shape {tuple(got.shape)} differs from the PyTorch model's {tuple(expected.shape)}"
        )
    if not torch.isfinite(got).all():
        raise ExportError("output contains NaN or inf")
    box_diff = float((got[:, :4] - expected[:, :4]).abs().max())
    score_diff = float((got[:, 4:] - expected[:, 4:]).abs().max())
    if not box_diff <= BOX_RTOL * imgsz:
        raise ExportError(
            f"boxes differ from the PyTorch model's by up to {box_diff:.3g} px, more than "
            f"{BOX_RTOL * imgsz:.3g} px ({BOX_RTOL:g} of the {imgsz}-px input)"
        )
    if not score_diff <= SCORE_ATOL:
        raise ExportError(
            f"class probabilities differ from the PyTorch model's by up to {score_diff:.3g}, "
            f"more than {SCORE_ATOL:g}"
        )
    nms = {"conf_thres": DETECTION_CONF, "iou_thres": DETECTION_IOU, "max_det": 1000}
    everything = {"conf_thres": DETECTION_CONF, "iou_thres": 1.0, "max_det": expected.shape[2]}
    matched = compare_detections(
        non_max_suppression(expected, **nms),
        non_max_suppression(got, **nms),
        non_max_suppression(expected, **everything),
        non_max_suppression(got, **everything),
    )
    return ExportCheck(box_diff, score_diff, matched)


def compare_detections(
    expected: list[torch.Tensor],
    got: list[torch.Tensor],
    expected_candidates: list[torch.Tensor],
    got_candidates: list[torch.Tensor],
    conf: float = DETECTION_CONF,
) -> int:
    """Raise ExportError unless every detection of one side has its counterpart on the other, per image.

    ``expected`` and ``got`` are NMS results, ``*_candidates`` the same outputs before NMS (every box
    above ``conf``); each one ``(n, 6)`` tensor ``[x1, y1, x2, y2, score, class]`` (xyxy pixels) per image.
    Returns the number of ``expected`` detections matched.

    Overlapping boxes whose scores are equal to within float noise may be ordered either way by NMS, so a
    detection missing on the other side is excused when the other side did compute it (it is among that
    side's candidates) and kept an overlapping box of at least its score (within ``SCORE_ATOL``) instead.
    """
    matched = 0
    sides = (
        ("the PyTorch model", expected, got, got_candidates),
        ("the export", got, expected, expected_candidates),
    )
    for side, dets_of, other_of, other_candidates_of in sides:
        for i, (dets, other, other_candidates) in enumerate(
            zip(dets_of, other_of, other_candidates_of, strict=True)
        ):
            for det in dets[dets[:, 4] >= conf + SCORE_ATOL]:
                problem = _mismatch(det, other)
                if not problem:
                    matched += side == "the PyTorch model"
                elif _mismatch(det, other_candidates) or not _suppressed(det, other):
                    box = ", ".join(f"{v:.1f}" for v in det[:4].tolist())
                    raise ExportError(
                        f"image {i}: detection of class {int(det[5])} at [{box}] with score "
                        f"{float(det[4]):.3f} from {side} has no counterpart ({problem})"
                    )
    return matched


def _mismatch(det: torch.Tensor, others: torch.Tensor) -> str:
    """Why none of ``others`` (n, 6) is the same detection as ``det`` (6,); empty when one is."""
    same_class = others[others[:, 5] == det[5]]
    if not len(same_class):
        return "no detection of that class"
    iou = pairwise_iou(det[None, :4], same_class[:, :4])[0]
    best = same_class[int(iou.argmax())]
    side_px = float((best[:4] - det[:4]).abs().max())
    score = abs(float(best[4] - det[4]))
    if (float(iou.max()) > DETECTION_MIN_IOU or side_px <= DETECTION_MAX_PX) and score <= SCORE_ATOL:
        return ""
    return f"nearest: IoU {float(iou.max()):.4f}, sides {side_px:.2f} px apart, scores {score:.2g} apart"


def _suppressed(det: torch.Tensor, kept: torch.Tensor) -> bool:
    """Whether a kept box of ``det``'s class overlaps it beyond the NMS threshold with at least its score."""
    same_class = kept[kept[:, 5] == det[5]]
    if not len(same_class):
        return False
    iou = pairwise_iou(det[None, :4], same_class[:, :4])[0]
    return bool(((iou > DETECTION_IOU) & (same_class[:, 4] >= det[4] - SCORE_ATOL)).any())


def check_onnx(model: nn.Module, path: str | Path, images: torch.Tensor) -> ExportCheck:
    """Run ``images`` (B, 3, S, S) float in [0, 1] through ``model`` and through the ONNX file with
    onnxruntime on CPU and compare them (:func:`compare_predictions`); raises ExportError on a mismatch."""
    import onnx

    onnx.checker.check_model(str(path))
    with torch.no_grad():
        expected = model.eval()(images.float())
    got = torch.from_numpy(onnx_session(path).run(None, {"images": images.float().numpy()})[0])
    return compare_predictions(expected, got, images.shape[-1])


def check_torchscript(model: nn.Module, path: str | Path, images: torch.Tensor) -> ExportCheck:
    """Like :func:`check_onnx`, for a TorchScript file (loaded on CPU)."""
    traced = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        expected, got = model.eval()(images.float()), traced(images.float())
    return compare_predictions(expected, got, images.shape[-1])
