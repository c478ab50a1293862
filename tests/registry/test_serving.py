"""The pyfunc model's pre- and post-processing, and the model saved and loaded through MLflow."""

import base64
import json

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.registry.serving import (
    SPEC_ARTIFACT,
    WEIGHTS_ARTIFACT,
    ModelSpec,
    ServingInputError,
    check_params,
    decode_image,
    encode_jpeg,
    load_pruned,
    postprocess,
    preprocess,
    pruned_architecture,
    request_images,
)

SPEC = ModelSpec(model_name="yolov9-t", num_classes=2, class_names=["circle", "square"], imgsz=64)


def red_image(h: int = 40, w: int = 60) -> np.ndarray:
    image = np.zeros((h, w, 3), dtype=np.uint8)
    image[..., 0] = 255  # RGB: red
    return image


def test_spec_round_trips_through_json():
    assert ModelSpec.from_json(SPEC.to_json()) == SPEC


def test_spec_with_wrong_number_of_class_names_is_refused():
    with pytest.raises(ValueError, match="2 classes but 1 class names"):
        ModelSpec(model_name="yolov9-t", num_classes=2, class_names=["a"], imgsz=64)


def test_spec_json_missing_a_key_is_refused():
    with pytest.raises(ValueError, match="not a model spec JSON"):
        ModelSpec.from_json(json.dumps({"model_name": "yolov9-t"}))


def test_uint8_array_passes_through_unchanged():
    image = red_image()
    assert decode_image(image) is image


def test_jpeg_bytes_decode_to_rgb():
    decoded = decode_image(encode_jpeg(red_image()))
    assert decoded.shape == (40, 60, 3)
    assert decoded[..., 0].mean() > 240 and decoded[..., 2].mean() < 15  # still red, not swapped to blue


def test_base64_text_decodes_like_the_bytes():
    raw = encode_jpeg(red_image())
    np.testing.assert_array_equal(decode_image(base64.b64encode(raw).decode()), decode_image(raw))


def test_undecodable_bytes_name_the_image():
    with pytest.raises(ServingInputError, match="image 3: 9 bytes that do not decode"):
        decode_image(b"not a jpg", index=3)


def test_float_array_is_refused():
    with pytest.raises(ServingInputError, match="HxWx3 uint8"):
        decode_image(np.zeros((4, 4, 3), dtype=np.float32))


def test_text_that_is_not_base64_is_refused():
    with pytest.raises(ServingInputError, match="base64"):
        decode_image("this is not base64!")


def test_dataframe_without_image_column_is_refused():
    with pytest.raises(ServingInputError, match="'image' column"):
        request_images(pd.DataFrame({"picture": [b"x"]}))


def test_plain_list_is_refused():
    with pytest.raises(ServingInputError, match="expected a DataFrame"):
        request_images([red_image()])


def test_empty_request_is_refused():
    with pytest.raises(ServingInputError, match="no images"):
        request_images(pd.DataFrame({"image": []}))


def test_preprocess_letterboxes_and_records_the_mapping():
    # 100 high x 200 wide into 64: ratio min(64/100, 64/200) = 0.32, resized 64 x 32, padded 16 on top
    batch = preprocess([np.full((100, 200, 3), 255, dtype=np.uint8)], 64)
    assert tuple(batch.images.shape) == (1, 3, 64, 64)
    assert batch.ratios == [pytest.approx(0.32)] and batch.pads == [(0, 16)] and batch.shapes == [(100, 200)]
    assert batch.images[0, :, 16:48].min() == 1.0 and batch.images[0, :, :16].max() < 0.5


def test_postprocess_maps_boxes_to_original_pixels_and_clips():
    batch = preprocess([np.zeros((100, 200, 3), dtype=np.uint8)], 64)
    # letterboxed [0, 16, 32, 48] -> ((x - 0) / 0.32, (y - 16) / 0.32): [0, 0, 100, 100];
    # [40, 10, 70, 30] -> [125, -18.75, 218.75, 43.75], clipped to the 200 x 100 image: [125, 0, 200, 43.75]
    det = torch.tensor([[0.0, 16.0, 32.0, 48.0, 0.9, 1.0], [40.0, 10.0, 70.0, 30.0, 0.5, 0.0]])
    (out,) = postprocess([det], batch, ["circle", "square"])
    assert out["boxes"] == [[0.0, 0.0, 100.0, 100.0], [125.0, 0.0, 200.0, 43.75]]
    assert (
        out["scores"] == [0.9, 0.5]
        and out["classes"] == [1, 0]
        and out["class_names"] == ["square", "circle"]
    )


def test_params_default_and_override():
    assert check_params(None) == {"conf": 0.25, "iou": 0.45, "max_det": 300}
    assert check_params({"conf": 0.5}) == {"conf": 0.5, "iou": 0.45, "max_det": 300}


def test_unknown_param_is_refused():
    with pytest.raises(ServingInputError, match="unknown params \\['threshold'\\]"):
        check_params({"threshold": 0.5})


def test_conf_outside_unit_interval_is_refused():
    with pytest.raises(ServingInputError, match="conf=1.5"):
        check_params({"conf": 1.5})


@pytest.mark.slow
def test_saved_state_dict_reloads_into_a_fresh_pruned_network(tmp_path):
    torch.manual_seed(0)
    model = pruned_architecture(SPEC)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(load_pruned(SPEC, tmp_path / "w.pt")(x), model.eval()(x))


@pytest.mark.slow
def test_weights_of_another_architecture_are_refused(tmp_path):
    torch.save(
        pruned_architecture(ModelSpec("yolov9-t", 3, ["a", "b", "c"], 64)).state_dict(), tmp_path / "w.pt"
    )
    with pytest.raises(ValueError, match="does not hold weights of a pruned yolov9-t"):
        load_pruned(SPEC, tmp_path / "w.pt")


@pytest.fixture(scope="module")
def saved_pyfunc(tmp_path_factory):
    """The detector saved as an MLflow model directory (models from code, no registry)."""
    import mlflow.pyfunc

    from pipeline.registry import serving

    d = tmp_path_factory.mktemp("pyfunc")
    torch.manual_seed(0)
    torch.save(pruned_architecture(SPEC).state_dict(), d / "w.pt")
    (d / "spec.json").write_text(SPEC.to_json())
    mlflow.pyfunc.save_model(
        d / "model",
        python_model=serving.__file__,
        signature=serving.signature(),
        artifacts={WEIGHTS_ARTIFACT: str(d / "w.pt"), SPEC_ARTIFACT: str(d / "spec.json")},
    )
    return mlflow.pyfunc.load_model(str(d / "model"))


@pytest.mark.slow
@pytest.mark.mlflow
def test_pyfunc_gives_one_row_per_image_with_the_output_columns(saved_pyfunc):
    images = [red_image(), np.zeros((50, 30, 3), dtype=np.uint8)]
    out = saved_pyfunc.predict(pd.DataFrame({"image": images}), params={"conf": 0.0001, "max_det": 5})
    assert list(out.columns) == ["boxes", "scores", "classes", "class_names"] and len(out) == 2
    assert all(len(b) <= 5 for b in out["boxes"])


@pytest.mark.slow
@pytest.mark.mlflow
def test_pyfunc_boxes_lie_inside_the_original_image(saved_pyfunc):
    out = saved_pyfunc.predict(
        pd.DataFrame({"image": [np.zeros((50, 30, 3), dtype=np.uint8)]}), params={"conf": 0.0001}
    )
    boxes = np.asarray(out["boxes"][0]).reshape(-1, 4)
    assert len(boxes) > 0
    assert boxes[:, [0, 2]].max() <= 30 and boxes[:, [1, 3]].max() <= 50 and boxes.min() >= 0


@pytest.mark.slow
@pytest.mark.mlflow
def test_pyfunc_jpeg_bytes_and_decoded_array_agree(saved_pyfunc):
    jpeg = encode_jpeg(red_image())
    rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    from_bytes = saved_pyfunc.predict(pd.DataFrame({"image": [jpeg]}), params={"conf": 0.0001})
    from_array = saved_pyfunc.predict(pd.DataFrame({"image": [rgb]}), params={"conf": 0.0001})
    assert from_bytes["boxes"][0] == from_array["boxes"][0]
