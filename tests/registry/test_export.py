"""Export checks: a correct ONNX/TorchScript export passes whatever the float noise between runtimes, and
the export bugs that matter (wrong anchor offset, missing sigmoid, the auxiliary branch exported) fail."""

import pytest
import torch
from torch import nn

from pipeline.registry.export import (
    DETECTION_CONF,
    ExportError,
    check_onnx,
    check_torchscript,
    compare_detections,
    compare_predictions,
    export_onnx,
    export_torchscript,
)
from yolov9 import build_model, prune
from yolov9.head import anchor_grid, decode

IMGSZ = 96
NUM_CLASSES = 3


@pytest.fixture(scope="module")
def dual() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("yolov9-t", num_classes=NUM_CLASSES).eval()
    # BatchNorm statistics and affine parameters spread as in a trained model, so that outputs depend on
    # the input and the two branches differ; class biases raised for confident detections to compare.
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.normal_(0, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.normal_(0, 0.2)
    for tower in (*model.head.cv3, *model.head.cv5):
        tower[-1].bias.data += 8.0
    return model


@pytest.fixture(scope="module")
def pruned(dual) -> nn.Module:
    return prune(dual).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(1))


class AnchorsWithoutHalfCellOffset(nn.Module):
    """The model as an exporter that put anchors on cell corners instead of cell centres would give."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(x)
        maps = [torch.empty(1, 1, IMGSZ // int(s), IMGSZ // int(s)) for s in self.model.head.stride]
        _, stride = anchor_grid(maps, self.model.head.stride)
        return torch.cat((y[:, :2] - 0.5 * stride.T, y[:, 2:]), 1)


class WithoutSigmoid(nn.Module):
    """The model with class logits where probabilities belong."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(x)
        return torch.cat((y[:, :4], torch.logit(y[:, 4:], eps=1e-6)), 1)


class AuxiliaryBranch(nn.Module):
    """The dual model's auxiliary branch, decoded: what exporting the unpruned model's first output gives."""

    def __init__(self, dual: nn.Module) -> None:
        super().__init__()
        self.dual = dual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        head, xs = self.dual.head, self.dual.head_inputs(x)
        aux = [torch.cat((head.cv2[i](xs[i]), head.cv3[i](xs[i])), 1) for i in range(head.nl)]
        return decode(aux, head.stride, head.dfl, head.nc)


def test_a_correct_onnx_export_passes_with_detections_compared(pruned, images, tmp_path):
    check = check_onnx(pruned, export_onnx(pruned, tmp_path / "m.onnx", IMGSZ), images)
    assert check.detections > 0
    assert check.box_diff_px < 0.05 and check.score_diff < 1e-4


def test_a_correct_torchscript_export_passes(pruned, images, tmp_path):
    check = check_torchscript(pruned, export_torchscript(pruned, tmp_path / "m.pt", IMGSZ), images)
    assert check.detections > 0


def test_float_noise_of_a_few_thousandths_of_a_pixel_passes(pruned, images):
    with torch.no_grad():
        expected = pruned(images)
    noisy = expected.clone()
    noisy[:, :4] += (
        0.0043 * torch.randn_like(noisy[:, :4]).sign()
    )  # the difference seen with onnxruntime 1.32
    noisy[:, 4:] += 1e-6
    assert compare_predictions(expected, noisy, IMGSZ).box_diff_px == pytest.approx(0.0043, rel=1e-3)


@pytest.mark.parametrize(
    ("bug", "message"),
    [
        (AnchorsWithoutHalfCellOffset, "boxes differ"),
        (WithoutSigmoid, "class probabilities differ"),
    ],
)
def test_an_onnx_export_bug_is_refused(bug, message, pruned, images, tmp_path):
    exported = export_onnx(bug(pruned).eval(), tmp_path / "bug.onnx", IMGSZ)
    with pytest.raises(ExportError, match=message):
        check_onnx(pruned, exported, images)


def test_an_exported_auxiliary_branch_is_refused(dual, pruned, images, tmp_path):
    exported = export_onnx(AuxiliaryBranch(dual).eval(), tmp_path / "aux.onnx", IMGSZ)
    with pytest.raises(ExportError, match="differ"):
        check_onnx(pruned, exported, images)


def test_a_wrong_output_shape_is_refused(pruned, images):
    with torch.no_grad():
        expected = pruned(images)
    with pytest.raises(ExportError, match="output shape"):
        compare_predictions(expected, expected[:, :-1], IMGSZ)


def detection(x1: float, score: float = 0.9, cls: int = 0) -> torch.Tensor:
    """One detection row [x1, y1, x2, y2, score, class] of a 40x40 box."""
    return torch.tensor([[x1, 10.0, x1 + 40.0, 50.0, score, float(cls)]])


def compare(expected: list[torch.Tensor], got: list[torch.Tensor]) -> int:
    """compare_detections with nothing suppressed by NMS: each side's candidates are its detections."""
    return compare_detections(expected, got, expected, got)


def test_detections_within_half_a_pixel_match():
    assert compare([detection(10.0)], [detection(10.3)]) == 1


def test_a_detection_one_pixel_off_is_refused():
    with pytest.raises(ExportError, match=r"image 0: detection of class 0 .* no counterpart .* 1.00 px"):
        compare([detection(10.0)], [detection(11.0)])


def test_a_detection_of_another_class_is_refused():
    with pytest.raises(ExportError, match="no detection of that class"):
        compare([detection(10.0, cls=0)], [detection(10.0, cls=1)])


def test_a_score_off_by_more_than_a_thousandth_is_refused():
    with pytest.raises(ExportError, match="scores 0.002 apart"):
        compare([detection(10.0, score=0.900)], [detection(10.0, score=0.902)])


def test_an_extra_detection_in_the_export_is_refused():
    with pytest.raises(ExportError, match="from the export"):
        compare([detection(10.0)], [torch.cat((detection(10.0), detection(200.0)))])


def test_a_detection_suppressed_by_an_overlapping_near_tie_is_excused():
    # scores 1e-7 apart: NMS keeps either box, depending on float noise
    kept_here, kept_there = detection(10.0, score=0.5), detection(22.0, score=0.5 + 1e-7)
    both = [torch.cat((kept_here, kept_there))]
    assert compare_detections([kept_here], [kept_there], both, both) == 0


def test_a_detection_the_export_never_computed_is_not_excused_by_an_overlapping_one():
    shifted = detection(11.0)  # a wrong offset moves every box: the export has no box at 10.0 at all
    with pytest.raises(ExportError, match="1.00 px apart"):
        compare_detections([detection(10.0)], [shifted], [detection(10.0)], [shifted])


def test_a_missing_detection_not_overlapped_by_another_is_refused():
    with pytest.raises(ExportError, match="from the PyTorch model"):
        compare([torch.cat((detection(10.0), detection(200.0, score=0.5)))], [detection(10.0)])


def test_a_detection_at_the_confidence_threshold_may_be_missing():
    borderline = detection(10.0, score=DETECTION_CONF + 0.0005)
    assert compare([borderline], [torch.zeros(0, 6)]) == 0
