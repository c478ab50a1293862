"""yolov9.build_model: structure, parameter counts and forward contracts of the dual and GELAN models."""

import io

import pytest
import torch
from torch import nn

from yolov9 import build_model
from yolov9.blocks import AConv, ADown, CBFuse, CBLinear, Conv, RepConvN

# Parameter counts of the reference implementation, nc = 80 (DFL integral weights included).
DUAL_PARAMS = {
    "yolov9-t": 3_717_680,
    "yolov9-s": 9_804_512,
    "yolov9-m": 32_878_432,
    "yolov9-c": 51_182_080,
    "yolov9-e": 69_529_664,
}
GELAN_PARAMS = {
    "gelan-t": 2_442_640,
    "gelan-s": 7_226_208,
    "gelan-m": 20_124_000,
    "gelan-c": 25_498_752,
    "gelan-e": 58_114_432,
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", DUAL_PARAMS)
def test_dual_model_has_reference_parameter_count(name):
    assert n_params(build_model(name)) == DUAL_PARAMS[name]


@pytest.mark.parametrize("name", GELAN_PARAMS)
def test_gelan_model_has_reference_parameter_count(name):
    assert n_params(build_model(name)) == GELAN_PARAMS[name]


def test_dual_training_forward_returns_aux_then_main_maps():
    model = build_model("yolov9-t", num_classes=3).train()
    out = model(torch.rand(2, 3, 64, 96))
    assert len(out) == 2
    for branch in out:
        assert [tuple(m.shape) for m in branch] == [(2, 67, 8, 12), (2, 67, 4, 6), (2, 67, 2, 3)]


def test_aux_maps_come_from_the_aux_half_of_the_head():
    model = build_model("yolov9-t", num_classes=3).train()
    with torch.no_grad():
        model.head.cv3[0][-1].bias.fill_(100.0)  # aux class logits at P3
    aux, main = model(torch.rand(1, 3, 64, 64))
    assert torch.all(aux[0][:, 64:] > 50)
    assert torch.all(main[0][:, 64:] < 50)


def test_gelan_training_forward_returns_one_list_of_maps():
    model = build_model("gelan-t", num_classes=5).train()
    out = model(torch.rand(1, 3, 64, 64))
    assert [tuple(m.shape) for m in out] == [(1, 69, 8, 8), (1, 69, 4, 4), (1, 69, 2, 2)]


def test_eval_forward_returns_main_branch_predictions_per_anchor():
    model = build_model("yolov9-s", num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.rand(3, 3, 64, 128))
    anchors = 8 * 16 + 4 * 8 + 2 * 4
    assert out.shape == (3, 4 + 7, anchors)
    assert torch.all((out[:, 4:] >= 0) & (out[:, 4:] <= 1))


def test_eval_boxes_are_xywh_in_input_pixels():
    # Zero box logits give a uniform distribution over 16 bins: every side sits 7.5 cells from
    # the anchor, so each box is centred on its cell centre and 15 strides wide and high.
    model = build_model("gelan-t", num_classes=2).eval()
    with torch.no_grad():
        for seq in model.head.cv2:
            seq[-1].weight.zero_()
            seq[-1].bias.zero_()
        out = model(torch.rand(1, 3, 64, 64))
    boxes = out[0, :4]
    assert torch.allclose(boxes[:, 0], torch.tensor([4.0, 4.0, 120.0, 120.0]))  # first P3 cell
    assert torch.allclose(boxes[:, 64], torch.tensor([8.0, 8.0, 240.0, 240.0]))  # first P4 cell
    assert torch.allclose(boxes[:, -1], torch.tensor([48.0, 48.0, 480.0, 480.0]))  # last P5 cell


def test_strides_are_8_16_32():
    assert build_model("yolov9-c").head.stride.tolist() == [8.0, 16.0, 32.0]


@pytest.mark.parametrize("shape", [(1, 3, 100, 64), (1, 3, 64, 48)])
def test_input_size_not_multiple_of_32_is_a_clear_error(shape):
    model = build_model("gelan-t", num_classes=1)
    with pytest.raises(ValueError, match="multiple of the model stride 32"):
        model(torch.rand(shape))


def test_input_with_wrong_channel_count_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        build_model("gelan-t", num_classes=1)(torch.rand(1, 1, 64, 64))


def test_output_widths_round_up_to_a_multiple_of_8():
    model = build_model("yolov9-m")
    assert isinstance(model.layers[17], AConv)
    assert model.layers[17].cv1.conv.out_channels == 184


def test_class_bias_starts_at_five_objects_per_640_image():
    import math

    head = build_model("gelan-t", num_classes=4).head
    for level, stride in enumerate((8, 16, 32)):
        expected = math.log(5 / 4 / (640 / stride) ** 2)
        assert torch.allclose(head.cv3[level][-1].bias, torch.full((4,), expected))
        assert torch.all(head.cv2[level][-1].bias == 1.0)


def test_building_leaves_batchnorm_statistics_untouched():
    model = build_model("yolov9-t")
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(bn.num_batches_tracked.item() == 0 for bn in bns)
    assert all(torch.all(bn.running_mean == 0) for bn in bns)


def test_number_of_classes_does_not_leak_between_models():
    small = build_model("yolov9-t", num_classes=3)
    default = build_model("yolov9-t")
    assert (small.head.nc, default.head.nc) == (3, 80)


def test_state_dict_round_trips_through_weights_only_load():
    model = build_model("yolov9-t", num_classes=3).eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    other = build_model("yolov9-t", num_classes=3).eval()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), other(x))


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="yolov9-t.*gelan-e"):
        build_model("yolov9-x")


@pytest.mark.parametrize("num_classes", [0, -1, 2.5, True])
def test_bad_number_of_classes_is_rejected(num_classes):
    with pytest.raises(ValueError, match="num_classes"):
        build_model("gelan-t", num_classes=num_classes)


def write_config(tmp_path, text):
    path = tmp_path / "custom.yaml"
    path.write_text(text)
    return path


def test_custom_config_path_builds(tmp_path):
    path = write_config(
        tmp_path,
        """
backbone:
  - [-1, 1, Conv, [16, 3, 2]]
  - [-1, 1, Conv, [32, 3, 2]]
  - [-1, 1, Conv, [32, 3, 2]]
head:
  - [-1, 1, Conv, [32, 3, 2]]
  - [-1, 1, Conv, [32, 3, 2]]
  - [[2, 3, 4], 1, DDetect, [nc]]
""",
    )
    model = build_model(path, num_classes=2)
    assert model.head.stride.tolist() == [8.0, 16.0, 32.0]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("[-1, 1, os.system, [16]]", "unknown block 'os.system'"),
        ("[-1, 2, Conv, [16, 3, 2]]", "repeats must be 1"),
        ("[5, 1, Conv, [16, 3, 2]]", "does not name an earlier layer"),
        ("[-1, 1, Conv, [abc, 3, 2]]", "bad arguments for Conv"),
        ("[-1, 1, Conv]", r"expected \[from, repeats, block, args\]"),
    ],
)
def test_malformed_config_row_names_the_layer_and_problem(tmp_path, row, message):
    path = write_config(tmp_path, f"backbone:\n  - {row}\nhead:\n  - [[0], 1, DDetect, [nc]]\n")
    with pytest.raises(ValueError, match=message) as info:
        build_model(path)
    assert "layer 0" in str(info.value)


def test_config_that_is_not_yaml_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not valid YAML"):
        build_model(write_config(tmp_path, "backbone: [unclosed\n"))


def test_conv_has_reference_batchnorm_settings():
    bn = Conv(3, 8).bn
    assert (bn.eps, bn.momentum) == (1e-3, 0.03)
    assert Conv(3, 8).conv.bias is None


def test_cbfuse_sums_selected_parts_upsampled_to_the_last_input():
    coarse = (torch.zeros(1, 2, 1, 1), torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]))
    target = torch.full((1, 1, 4, 4), 10.0)
    out = CBFuse([1])([coarse, target])
    expected = torch.tensor([[11, 11, 12, 12], [11, 11, 12, 12], [13, 13, 14, 14], [13, 13, 14, 14.0]])
    assert torch.equal(out[0, 0], expected)


def test_cblinear_splits_into_the_requested_widths():
    parts = CBLinear(8, [4, 2, 6])(torch.rand(1, 8, 4, 4))
    assert [p.shape[1] for p in parts] == [4, 2, 6]


def test_adown_halves_resolution_and_splits_channels():
    block = ADown(16, 32)
    assert block(torch.rand(1, 16, 16, 16)).shape == (1, 32, 8, 8)
    assert block.cv1.conv.in_channels == 8 and block.cv1.conv.out_channels == 16


def randomise_batchnorm(module: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            n = bn.num_features
            bn.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            bn.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            bn.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            bn.bias.data.copy_(torch.rand(n, generator=g) - 0.5)


def test_conv_fuse_preserves_eval_output():
    conv = Conv(4, 8, 3, 2)
    randomise_batchnorm(conv)
    conv.eval()
    x = torch.rand(2, 4, 9, 9)
    expected = conv(x)
    conv.fuse()
    assert conv.bn is None and conv.conv.bias is not None
    assert torch.allclose(conv(x), expected, atol=1e-5)


def test_repconvn_fuse_preserves_eval_output():
    block = RepConvN(4, 6)
    randomise_batchnorm(block)
    block.eval()
    x = torch.rand(2, 4, 7, 7)
    expected = block(x)
    block.fuse()
    assert not hasattr(block, "conv1")
    assert torch.allclose(block(x), expected, atol=1e-5)
