"""What the endpoint reads from a request, and how it refuses one: the status and a message naming the
problem (pipeline/endpoint/request.py)."""

import base64
import json

import cv2
import numpy as np
import pytest

from pipeline.endpoint.request import Limits, RequestError, read_request

LIMITS = Limits()


def jpeg(h: int = 24, w: int = 32, level: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.full((h, w, 3), level, np.uint8))
    assert ok
    return buf.tobytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def as_json(request: dict) -> bytes:
    return json.dumps(request).encode()


def refused(body: bytes, content_type: str = "application/json", query=None, limits=LIMITS) -> RequestError:
    with pytest.raises(RequestError) as e:
        read_request(body, content_type, query or {}, limits)
    return e.value


@pytest.mark.parametrize(
    "request_json",
    [
        {"dataframe_split": {"columns": ["image"], "data": [["A"], ["B"]]}},
        {"dataframe_records": [{"image": "A"}, {"image": "B"}]},
        {"inputs": ["A", "B"]},
        {"instances": [{"image": "A"}, {"image": "B"}]},
    ],
)
def test_each_json_layout_of_the_pyfunc_model_gives_its_images_in_order(request_json):
    images = {"A": b64(jpeg(24, 32)), "B": b64(jpeg(40, 16))}
    filled = json.loads(
        json.dumps(request_json).replace('"A"', f'"{images["A"]}"').replace('"B"', f'"{images["B"]}"')
    )
    detection = read_request(as_json({**filled, "params": {"conf": 0.5}}), "application/json", {}, LIMITS)
    assert [image.shape for image in detection.images] == [(24, 32, 3), (40, 16, 3)]
    assert detection.params == {"conf": 0.5, "iou": 0.45, "max_det": 300}


def test_raw_image_bytes_take_their_parameters_from_the_query_string():
    detection = read_request(jpeg(), "image/jpeg", {"max_det": "7", "iou": "0.6"}, LIMITS)
    assert len(detection.images) == 1 and detection.images[0].dtype == np.uint8
    assert detection.params == {"conf": 0.25, "iou": 0.6, "max_det": 7}


def test_equal_parameters_make_equal_batch_keys():
    one = read_request(jpeg(), "image/jpeg", {"conf": "0.3"}, LIMITS)
    two = read_request(
        as_json({"inputs": [b64(jpeg())], "params": {"conf": 0.3}}), "application/json", {}, LIMITS
    )
    assert one.params_key() == two.params_key() == (0.3, 0.45, 300)


def test_an_empty_body_is_a_400():
    assert refused(b"", "image/jpeg").status == 400


def test_bytes_that_are_not_an_image_are_a_400_naming_the_image():
    error = refused(b"hello", "image/png")
    assert error.status == 400 and "image 0" in str(error) and "do not decode" in str(error)


def test_a_truncated_jpeg_is_a_400():
    data = jpeg(64, 64)
    assert refused(data[: len(data) // 2], "image/jpeg").status == 400


def test_a_body_over_the_limit_is_a_413():
    error = refused(jpeg(), "image/jpeg", limits=Limits(max_body_bytes=100))
    assert error.status == 413 and "over the limit of 100" in str(error)


def test_an_image_over_the_pixel_limit_is_a_413_before_it_is_decoded():
    error = refused(jpeg(100, 100), "image/jpeg", limits=Limits(max_pixels=99 * 100))
    assert error.status == 413 and "100x100 pixels" in str(error)


def test_too_many_images_in_one_request_is_a_413():
    error = refused(as_json({"inputs": [b64(jpeg())] * 3}), limits=Limits(max_images=2))
    assert error.status == 413 and "3 images" in str(error)


def test_an_unknown_parameter_is_a_400_naming_it():
    error = refused(as_json({"inputs": [b64(jpeg())], "params": {"confidence": 0.3}}))
    assert error.status == 400 and "confidence" in str(error)


def test_a_parameter_out_of_range_is_a_400():
    assert refused(jpeg(), "image/jpeg", {"conf": "1.5"}).status == 400


def test_a_query_parameter_that_is_not_a_number_is_a_400():
    assert refused(jpeg(), "image/jpeg", {"max_det": "many"}).status == 400


def test_query_parameters_beside_json_are_a_400_saying_where_they_go():
    error = refused(as_json({"inputs": [b64(jpeg())]}), query={"conf": "0.3"})
    assert error.status == 400 and "'params'" in str(error)


def test_json_without_images_is_a_400():
    assert "no images" in str(refused(as_json({"inputs": []})))


def test_json_with_two_layouts_or_an_unknown_key_is_a_400():
    assert refused(as_json({"inputs": ["x"], "instances": ["x"]})).status == 400
    assert refused(as_json({"images": ["x"]})).status == 400


def test_text_that_is_not_base64_is_a_400():
    assert "not base64" in str(refused(as_json({"inputs": ["not base64!"]})))


def test_invalid_json_is_a_400():
    assert "not valid JSON" in str(refused(b"{"))


def test_another_content_type_is_a_415():
    assert refused(b"x", "text/plain").status == 415
