"""Runware's width/height semantics: validate_dimension, target_size and resize_to.

width/height only ever downscale; there is no forced 512 and no multiple of 64.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.imageio import MAX_DIMENSION, resize_to, target_size, validate_dimension
from guideflow.errors import InvalidParameter

# (input w, input h, width, height, expected (w, h))
TARGET_CASES = [
    pytest.param(640, 480, None, None, (640, 480), id="no-dims-keeps-input"),
    pytest.param(640, 480, 320, None, (320, 240), id="width-only-smaller-target"),
    pytest.param(640, 480, 1000, None, (640, 480), id="width-only-larger-target-no-upscale"),
    pytest.param(640, 480, 640, None, (640, 480), id="width-only-equal"),
    pytest.param(640, 480, None, 240, (320, 240), id="height-only-smaller-target"),
    pytest.param(640, 480, None, 2000, (640, 480), id="height-only-larger-target-no-upscale"),
    pytest.param(640, 480, None, 480, (640, 480), id="height-only-equal"),
    pytest.param(640, 480, 300, 200, (300, 200), id="both-smaller-than-input-exact-size"),
    pytest.param(640, 480, 300, 900, (300, 480), id="both-height-axis-already-smaller"),
    pytest.param(640, 480, 900, 100, (640, 100), id="both-width-axis-already-smaller"),
    pytest.param(640, 480, 1024, 1024, (640, 480), id="both-larger-than-input-no-upscale"),
    pytest.param(640, 480, 640, 480, (640, 480), id="both-equal"),
    # 1000×333 → width 500: 166.5 rounds half up to 167
    pytest.param(1000, 333, 500, None, (500, 167), id="width-rounds-half-up"),
    # 333×1000 → height 500: 166.5 → 167
    pytest.param(333, 1000, None, 500, (167, 500), id="height-rounds-half-up"),
    # 564×846 → width 512: 846*512/564 = 768.0
    pytest.param(564, 846, 512, None, (512, 768), id="photo-size-exact"),
    # 1001×667 → width 300: 199.9 → 200
    pytest.param(1001, 667, 300, None, (300, 200), id="odd-aspect-rounds-up"),
    # 1003×667 → width 300: 200100/1003 ≈ 199.501 → 200
    pytest.param(1003, 667, 300, None, (300, 200), id="odd-aspect-just-over-half"),
    # 1000×301 → width 10: 3.01 → 3
    pytest.param(1000, 301, 10, None, (10, 3), id="odd-aspect-rounds-down"),
    pytest.param(10000, 10, 1, None, (1, 1), id="tiny-width-keeps-height-at-least-1"),
    pytest.param(10, 10000, None, 1, (1, 1), id="tiny-height-keeps-width-at-least-1"),
    pytest.param(5000, 2, 100, None, (100, 1), id="flat-result-at-least-1"),
    pytest.param(1, 1, 1, 1, (1, 1), id="one-pixel"),
]


@pytest.mark.parametrize(("in_w", "in_h", "width", "height", "expected"), TARGET_CASES)
def test_target_size(
    in_w: int, in_h: int, width: int | None, height: int | None, expected: tuple[int, int]
) -> None:
    assert target_size(in_w, in_h, width, height) == expected


@pytest.mark.parametrize(
    ("in_w", "in_h", "width", "height"),
    [
        (w, h, tw, th)
        for w, h in [(640, 480), (7, 1999), (4000, 3)]
        for tw in (None, 1, 5, 333, 5000)
        for th in (None, 1, 5, 333, 5000)
    ],
)
def test_target_size_never_upscales_and_is_positive(
    in_w: int, in_h: int, width: int | None, height: int | None
) -> None:
    w, h = target_size(in_w, in_h, width, height)
    assert 1 <= w <= in_w and 1 <= h <= in_h
    if width is not None:
        assert w <= width
    if height is not None:
        assert h <= height


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(None, None, id="none"),
        pytest.param(1, 1, id="one"),
        pytest.param(512, 512, id="int"),
        pytest.param(512.0, 512, id="integral-float"),
        pytest.param("512", 512, id="numeric-string"),
        pytest.param(np.int64(300), 300, id="numpy-int"),
        pytest.param(MAX_DIMENSION, MAX_DIMENSION, id="max"),
    ],
)
def test_validate_dimension_accepts(value: object, expected: int | None) -> None:
    result = validate_dimension(value, "width")
    assert result == expected
    assert result is None or type(result) is int


@pytest.mark.parametrize("name", ["width", "height"])
@pytest.mark.parametrize(
    "value",
    [
        pytest.param(0, id="zero"),
        pytest.param(-5, id="negative"),
        pytest.param(1.5, id="fraction"),
        pytest.param("abc", id="non-numeric-string"),
        pytest.param("", id="empty-string"),
        pytest.param(True, id="bool-true"),
        pytest.param(False, id="bool-false"),
        pytest.param(float("nan"), id="nan"),
        pytest.param(float("inf"), id="inf"),
        pytest.param([512], id="list"),
        pytest.param(10**6, id="too-large"),
        pytest.param(MAX_DIMENSION + 1, id="just-over-max"),
    ],
)
def test_validate_dimension_rejects(value: object, name: str) -> None:
    with pytest.raises(InvalidParameter) as info:
        validate_dimension(value, name)
    err = info.value.to_error_object()
    assert err["code"] == "invalidParameter"
    assert err["parameter"] == name
    assert name in err["message"]


@pytest.mark.parametrize(
    ("shape", "size"),
    [
        pytest.param((480, 640, 3), (320, 240), id="rgb-half"),
        pytest.param((480, 640, 3), (640, 100), id="rgb-one-axis"),
        pytest.param((480, 640), (17, 13), id="gray"),
        pytest.param((3, 5000, 3), (100, 1), id="flat"),
    ],
)
def test_resize_to_shape(shape: tuple[int, ...], size: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, shape, dtype=np.uint8)
    out = resize_to(arr, size)
    assert out.shape == (size[1], size[0], *shape[2:])
    assert out.dtype == np.uint8


def test_resize_to_same_size_is_identity() -> None:
    arr = np.zeros((48, 64, 3), dtype=np.uint8)
    assert resize_to(arr, (64, 48)) is arr


def test_resize_to_averages_area() -> None:
    """INTER_AREA: a 2× downscale of a 0/255 checkerboard is flat mid-grey, not aliased."""
    board = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)
    out = resize_to(np.dstack([board] * 3), (32, 32))
    assert np.all(np.abs(out.astype(int) - 128) <= 1)


def test_resize_to_refuses_upscale() -> None:
    with pytest.raises(ValueError):
        resize_to(np.zeros((10, 10, 3), dtype=np.uint8), (20, 10))
