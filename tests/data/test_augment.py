"""Augmentation geometry: boxes follow the pixels, stay inside the canvas, and a seed fixes everything."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.augment import (
    AugmentConfig,
    Labelled,
    affine_letterbox,
    augment_train_sample,
    box_candidates,
    color_jitter,
    color_matrix,
    hflip_boxes,
    mixup,
    mosaic_affine,
)
from pipeline.data.letterbox import PAD_VALUE, letterbox, letterbox_boxes, unletterbox_boxes

RED = (255, 0, 0)  # RGB
NO_AUGMENT = AugmentConfig(hsv_h=0, hsv_s=0, hsv_v=0, translate=0, scale=0, fliplr=0, mosaic=0, mixup=0)
STRONG = AugmentConfig(degrees=30, translate=0.3, scale=0.9, shear=10, mixup=0.5)


@pytest.fixture
def red_block() -> Labelled:
    """A 90 x 120 grey image with a red rectangle covering columns 30..79 and rows 20..59 (its box)."""
    image = np.full((90, 120, 3), 60, dtype=np.uint8)
    image[20:60, 30:80] = RED
    return Labelled(image, np.array([[30, 20, 80, 60]], np.float32), np.array([4], np.int64))


def is_red(pixels: np.ndarray) -> np.ndarray:
    return (pixels[..., 0] > 200) & (pixels[..., 1] < 50) & (pixels[..., 2] < 50)


def test_letterbox_fits_the_long_side_and_centres_the_padding():
    image = np.zeros((50, 100, 3), np.uint8)
    out, ratio, pad = letterbox(image, 64)
    assert out.shape == (64, 64, 3) and ratio == 0.64 and pad == (0, 16)
    assert (out[:16] == PAD_VALUE).all() and (out[16:48] == 0).all() and (out[48:] == PAD_VALUE).all()


def test_letterbox_then_unletterbox_maps_boxes_back_exactly():
    boxes = np.array([[0, 0, 100, 50], [12.5, 3.25, 40, 41]], np.float32)
    _, ratio, pad = letterbox(np.zeros((50, 100, 3), np.uint8), 640)
    np.testing.assert_allclose(
        unletterbox_boxes(letterbox_boxes(boxes, ratio, pad), ratio, pad), boxes, atol=1e-4
    )


def test_letterbox_rejects_a_greyscale_image():
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        letterbox(np.zeros((10, 10), np.uint8), 32)


def test_hflip_boxes_mirrors_boxes_about_the_image_width(red_block):
    assert hflip_boxes(red_block.boxes, 120).tolist() == [[120 - 80, 20, 120 - 30, 60]]


def test_flipped_sample_keeps_its_box_on_the_mirrored_pixels(red_block):
    flip_only = AugmentConfig(hsv_h=0, hsv_s=0, hsv_v=0, translate=0, scale=0, fliplr=1.0, mosaic=0, mixup=0)
    out = augment_train_sample(red_block, [], 120, flip_only, use_mosaic=False, rng=np.random.default_rng(0))
    # Letterboxed into 120x120: the 90 rows are centred with 15 rows of padding above.
    assert out.boxes.tolist() == [[40, 35, 90, 75]]
    assert is_red(out.image[35:75, 40:90]).all() and not is_red(out.image[:, :40]).any()


def test_unaugmented_no_mosaic_path_returns_the_image_unchanged():
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    src = Labelled(image, np.array([[1, 2, 30, 40]], np.float32), np.array([1]))
    out = augment_train_sample(src, [], 64, NO_AUGMENT, use_mosaic=True, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(out.image, image)
    np.testing.assert_allclose(out.boxes, src.boxes, atol=1e-4)


def test_affine_letterbox_box_covers_the_moved_rectangle(red_block):
    cfg = AugmentConfig(translate=0.2, scale=0.5)
    for seed in range(10):
        out = affine_letterbox(red_block, 128, cfg, np.random.default_rng(seed))
        for x1, y1, x2, y2 in out.boxes:
            inner = out.image[int(y1) + 2 : int(np.ceil(y2)) - 2, int(x1) + 2 : int(np.ceil(x2)) - 2]
            assert is_red(inner).all()


def test_mosaic_output_shape_and_boxes_land_on_the_red_rectangles(red_block):
    cfg = AugmentConfig(degrees=0, shear=0)
    kept = 0
    for seed in range(10):
        out = mosaic_affine([red_block] * 4, 128, cfg, np.random.default_rng(seed))
        assert out.image.shape == (128, 128, 3) and out.image.dtype == np.uint8
        assert out.classes.tolist() == [4] * len(out.boxes)
        for x1, y1, x2, y2 in out.boxes:
            inner = out.image[int(y1) + 1 : int(np.ceil(y2)) - 1, int(x1) + 1 : int(np.ceil(x2)) - 1]
            assert inner.size and is_red(inner).all()
            kept += 1
        # Red pixels outside every returned box would mean a box was lost or misplaced.
        covered = np.zeros((128, 128), bool)
        for x1, y1, x2, y2 in out.boxes:
            covered[int(y1) : int(np.ceil(y2)), int(x1) : int(np.ceil(x2))] = True
        assert not (is_red(out.image) & ~covered).sum() > 3 * 128  # slivers of dropped tiny boxes only
    assert kept > 10


def test_rotated_mosaic_box_centres_are_red(red_block):
    cfg = AugmentConfig(degrees=25, shear=5, scale=0.3)
    checked = 0
    for seed in range(10):
        out = mosaic_affine([red_block] * 4, 128, cfg, np.random.default_rng(seed))
        for x1, y1, x2, y2 in out.boxes:
            if min(x1, y1) > 0 and max(x2, y2) < 128 and min(x2 - x1, y2 - y1) > 8:
                assert is_red(out.image[int((y1 + y2) / 2), int((x1 + x2) / 2)])
                checked += 1
    assert checked > 5


def test_quadrants_do_not_overwrite_each_other():
    tiles = [
        Labelled(
            np.full((64, 64, 3), 40 * (i + 1), np.uint8), np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
        )
        for i in range(4)
    ]
    cfg = AugmentConfig(translate=0, scale=0)  # zoom 1: the output is the central crop of the 2x canvas
    rng = np.random.default_rng(1)
    out = mosaic_affine(tiles, 64, cfg, np.random.default_rng(1)).image
    xc, yc = (int(rng.uniform(32, 96)) for _ in range(2))  # the same draws the mosaic made
    cx, cy = xc - 32, yc - 32  # centre in output pixels
    for level, (ys, xs) in zip(
        (40, 80, 120, 160),
        [
            (slice(0, cy), slice(0, cx)),
            (slice(0, cy), slice(cx, 64)),
            (slice(cy, 64), slice(0, cx)),
            (slice(cy, 64), slice(cx, 64)),
        ],
        strict=True,
    ):
        region = out[ys, xs].astype(int)
        assert region.size == 0 or (np.abs(region - level) <= 1).all()


@pytest.mark.parametrize("mosaic", [True, False])
def test_boxes_stay_inside_the_canvas_under_strong_augmentation(red_block, mosaic):
    for seed in range(20):
        out = augment_train_sample(
            red_block, [red_block] * 3, 96, STRONG, mosaic, np.random.default_rng(seed)
        )
        assert out.image.shape == (96, 96, 3)
        assert out.boxes.dtype == np.float32 and out.classes.dtype == np.int64
        assert (out.boxes >= 0).all() and (out.boxes <= 96).all()
        assert (out.boxes[:, 2] - out.boxes[:, 0] >= 2).all() and (
            out.boxes[:, 3] - out.boxes[:, 1] >= 2
        ).all()


def test_same_seed_gives_the_same_sample(red_block):
    a, b = (
        augment_train_sample(red_block, [red_block] * 3, 64, STRONG, True, np.random.default_rng(5))
        for _ in range(2)
    )
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.boxes, b.boxes)


def test_box_candidates_drop_thin_tiny_and_elongated_boxes():
    before = np.array([[0, 0, 10, 10]] * 4 + [[0, 0, 100, 10]], np.float32)
    after = np.array(
        [[0, 0, 10, 10], [0, 0, 1.5, 10], [0, 0, 3, 3], [0, 0, 10, 10], [0, 0, 50, 2.4]], np.float32
    )
    # kept; thinner than 2 px; 9 px^2 < 10% of 100; kept; aspect 50/2.4 > 20
    assert box_candidates(before, after, zoom=1.0).tolist() == [True, False, False, True, False]


def test_box_candidates_compare_areas_after_the_zoom():
    before = np.array([[0, 0, 10, 10]], np.float32)
    after = np.array([[0, 0, 5, 5]], np.float32)  # 25 px^2: 25% of 100, but 6.25% of 100 * 2**2
    assert box_candidates(before, after, zoom=2.0).tolist() == [False]


def test_hue_and_saturation_jitter_keep_grey_grey():
    grey = np.full((8, 8, 3), 77, np.uint8)
    np.testing.assert_array_equal(color_jitter(grey, np.random.default_rng(0), 0.5, 0.9, 0.0), grey)


def test_value_jitter_scales_brightness_by_the_drawn_gain():
    grey = np.full((8, 8, 3), 100, np.uint8)
    gain = np.random.default_rng(3).uniform(-1, 1, 3)[2] * 0.4 + 1  # the draw color_jitter makes for V
    out = color_jitter(grey, np.random.default_rng(3), 0.0, 0.0, 0.4)
    assert abs(int(out[0, 0, 0]) - 100 * gain) <= 1


def test_value_gain_scales_every_channel():
    np.testing.assert_allclose(color_matrix(1.0, 1.0, 1.3), 1.3 * np.eye(3), atol=1e-12)


def test_saturation_gain_scales_the_distance_from_the_luma_grey():
    rgb = np.array([200.0, 100.0, 50.0])
    luma = 0.299 * 200 + 0.587 * 100 + 0.114 * 50  # 124.2
    np.testing.assert_allclose(color_matrix(1.0, 0.5, 1.0) @ rgb, luma + 0.5 * (rgb - luma), atol=1e-9)


def test_zero_saturation_gives_the_luma_grey():
    np.testing.assert_allclose(color_matrix(1.0, 0.0, 1.0) @ np.array([255.0, 0, 0]), [76.245] * 3, atol=1e-9)


def test_hue_gain_turns_colours_about_the_grey_axis():
    # A hue gain of 4/3 turns by 60 degrees, red towards yellow as a rising HSV hue does; a rotation about
    # the grey axis keeps the channel sum (3) and the distance from grey.
    turned = color_matrix(1.0 + 1.0 / 3.0, 1.0, 1.0) @ np.array([3.0, 0.0, 0.0])
    np.testing.assert_allclose(turned, [2.0, 2.0, -1.0], atol=1e-9)


def test_jitter_saturates_at_255_instead_of_wrapping():
    gain = np.random.default_rng(2).uniform(-1, 1, 3)[2] * 0.9 + 1  # 1.57
    out = color_jitter(np.full((2, 2, 3), 250, np.uint8), np.random.default_rng(2), 0.0, 0.0, 0.9)
    assert gain > 1.5 and (out == 255).all()


def test_jitter_writes_into_the_given_array():
    image = np.full((4, 4, 3), 100, np.uint8)
    dst = np.zeros_like(image)
    out = color_jitter(image, np.random.default_rng(0), 0.0, 0.0, 0.5, dst=dst)
    assert out is dst and (dst != 0).all() and (image == 100).all()


def test_mixup_blends_pixels_and_keeps_both_box_sets():
    a = Labelled(np.full((4, 4, 3), 0, np.uint8), np.array([[0, 0, 2, 2]], np.float32), np.array([1]))
    b = Labelled(np.full((4, 4, 3), 200, np.uint8), np.array([[1, 1, 3, 3]], np.float32), np.array([2]))
    out = mixup(a, b, np.random.default_rng(0))
    r = np.random.default_rng(0).beta(32.0, 32.0)
    assert abs(int(out.image[0, 0, 0]) - 200 * (1 - r)) <= 1
    assert out.boxes.tolist() == [[0, 0, 2, 2], [1, 1, 3, 3]] and out.classes.tolist() == [1, 2]


def test_config_rejects_a_probability_above_one():
    with pytest.raises(ValueError, match="fliplr is a probability"):
        AugmentConfig(fliplr=1.5)
