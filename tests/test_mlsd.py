"""mlsd on real photos with the real M-LSD tiny weights in ../shared/models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from engine import registry
from engine.imageio import decode_image
from engine.models.store import ModelStore
from engine.preprocessors import mlsd as mlsd_mod
from engine.registry import ProcessContext
from guideflow.errors import InvalidParameter, ModelCorrupt, ModelUnavailable


def _run(
    image: np.ndarray, settings: dict[str, Any], store: ModelStore
) -> tuple[np.ndarray, dict[str, Any]]:
    proc = registry.get("mlsd")
    ctx = ProcessContext(seed=0, models=store)
    out = proc.process(image, proc.validate(settings), ctx)
    assert out.dtype == np.uint8 and out.shape == (*image.shape[:2], 3)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all()
    return out[..., 0], ctx.meta


@pytest.fixture(scope="module")
def store(models_dir: Path) -> ModelStore:
    return ModelStore(models_dir, allow_download=False)


@pytest.fixture(scope="module")
def photos(images_dir: Path) -> dict[str, np.ndarray]:
    return {
        name: decode_image((images_dir / name).read_bytes())
        for name in ("room.png", "building.png")
    }


@pytest.fixture(scope="module")
def default_lines(photos, store) -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
    return {name: _run(rgb, {}, store) for name, rgb in photos.items()}


@pytest.mark.parametrize("name", ["room.png", "building.png"])
def test_lines_are_white_one_pixel_and_on_real_edges(photos, default_lines, name) -> None:
    """Many lines, pure white on black, 1 px wide, and lying on the photo's straight edges.

    Measured: 199 (room) and 200 (building) lines; 80 % and 98 % of line pixels within 3 px
    of a Canny(50, 150) edge. Feeding the network ControlNet's torch convention (x/127.5 − 1)
    instead of 0..255 finds no line at all on room.png.
    """
    lines, meta = default_lines[name]
    assert meta["model"] == "mlsd_tiny"
    assert meta["lines"] >= 100
    assert set(np.unique(lines).tolist()) == {0, 255}
    white = lines == 255
    assert 0.005 < white.mean() < 0.1
    # 1 px: few pixels survive a 3×3 erosion, only where near-duplicate lines run side by
    # side (measured 1.2 % on room, 5.6 % on building; thickness 2 would give 35 % / 42 %).
    eroded = cv2.erode(white.astype(np.uint8), np.ones((3, 3), np.uint8))
    assert eroded.sum() < 0.1 * white.sum()
    gray = cv2.cvtColor(photos[name], cv2.COLOR_RGB2GRAY)
    near = cv2.dilate(cv2.Canny(gray, 50, 150), np.ones((7, 7), np.uint8)) > 0
    assert (white & near).sum() / white.sum() >= 0.7


@pytest.mark.parametrize("name", ["room.png", "building.png"])
def test_high_score_threshold_keeps_fewer_lines(photos, default_lines, store, name) -> None:
    """scoreThreshold 0.9 keeps only the most confident lines (measured 11 and 8), each a
    clean 1-px line with no 2×2 white block."""
    loose, loose_meta = default_lines[name]
    strict, strict_meta = _run(photos[name], {"scoreThreshold": 0.9}, store)
    assert 0 < strict_meta["lines"] < loose_meta["lines"] / 4
    assert 0 < (strict == 255).sum() < (loose == 255).sum()
    w = strict == 255
    assert not (w[:-1, :-1] & w[1:, :-1] & w[:-1, 1:] & w[1:, 1:]).any()
    # Every strict line is one of the loose ones: the loose map covers the strict pixels.
    assert (loose[w] == 255).mean() > 0.99


def test_distance_threshold_drops_short_lines(photos, default_lines, store) -> None:
    """distanceThreshold 20 (in 256-grid units) drops the short segments (measured 199 → 105)."""
    _, loose_meta = default_lines["room.png"]
    _, meta = _run(photos["room.png"], {"distanceThreshold": 20}, store)
    assert 0 < meta["lines"] < loose_meta["lines"]


@pytest.mark.parametrize("value", [0, 128, 255])
def test_flat_image_has_no_lines(store, value) -> None:
    lines, meta = _run(np.full((300, 400, 3), value, np.uint8), {}, store)
    assert meta["lines"] <= 2
    assert (lines == 255).mean() < 0.002


@pytest.mark.parametrize(("width", "height"), [(700, 390), (333, 517)])
def test_output_size_equals_input_and_lines_scale_with_it(photos, store, width, height) -> None:
    """Non-square outputs: same size as the input, lines still on the (resized) edges."""
    image = cv2.resize(photos["building.png"], (width, height), interpolation=cv2.INTER_AREA)
    lines, meta = _run(image, {}, store)
    assert lines.shape == (height, width)
    white = lines == 255
    assert meta["lines"] >= 100
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    near = cv2.dilate(cv2.Canny(gray, 50, 150), np.ones((7, 7), np.uint8)) > 0
    assert (white & near).sum() / white.sum() >= 0.7


def test_decode_lines_follows_pred_lines() -> None:
    """Synthetic outputs: start = centre + disp[0:2], end = centre + disp[2:4], ×2, (x, y).

    Centres are (y, x). Kept only when score > threshold and |start − end| > distance.
    """
    disp = np.zeros((256, 256, 4), np.float32)
    disp[10, 20] = (-5, 1, 5, -1)  # length √104 ≈ 10.2
    disp[100, 30] = (0, -2, 0, 2)  # length 4
    disp[200, 40] = (3, 0, -3, 0)  # length 6, low score
    centres = np.array([[10, 20], [100, 30], [200, 40]], np.int32)
    scores = np.array([0.8, 0.6, 0.05], np.float32)
    lines = mlsd_mod.decode_lines(centres, scores, disp, 0.1, 5.0)
    np.testing.assert_allclose(lines, [[(20 - 5) * 2, (10 + 1) * 2, (20 + 5) * 2, (10 - 1) * 2]])
    both = mlsd_mod.decode_lines(centres, scores, disp, 0.1, 0.1)
    assert both.shape == (2, 4)
    np.testing.assert_allclose(both[1], [60, 196, 60, 204])
    assert mlsd_mod.decode_lines(centres, scores, disp, 0.9, 0.1).shape == (0, 4)


def test_draw_lines_scales_512_space_to_the_output() -> None:
    """A 512-space segment lands at the same relative place on a 200×100 (W×H) canvas."""
    canvas = mlsd_mod.draw_lines(np.array([[0.0, 256.0, 511.0, 256.0]]), 200, 100)
    assert canvas.shape == (100, 200)
    rows = np.flatnonzero(canvas.any(axis=1))
    assert rows.tolist() == [50]
    assert (canvas[50] == 255).sum() == 200


def test_settings_are_validated() -> None:
    proc = registry.get("mlsd")
    assert proc.validate({}) == {
        "variant": "default",
        "scoreThreshold": 0.1,
        "distanceThreshold": 0.1,
    }
    assert proc.validate({"valueThreshold": "0.5"})["scoreThreshold"] == 0.5
    assert proc.price_class == "depth"
    for bad in ({"scoreThreshold": 1.5}, {"distanceThreshold": -1}, {"xdogThreshold": 3}):
        with pytest.raises(InvalidParameter) as info:
            proc.validate(bad)
        assert info.value.parameter == next(iter(bad))


def test_missing_weights_are_model_unavailable_with_the_fix(tmp_path: Path) -> None:
    empty = ModelStore(tmp_path, allow_download=False)
    with pytest.raises(ModelUnavailable) as info:
        _run(np.zeros((64, 64, 3), np.uint8), {}, empty)
    message = info.value.message
    assert "mlsd_tiny_512.onnx" in message
    assert str(tmp_path / "mlsd_tiny" / "mlsd_tiny_512.onnx") in message
    assert "Fix:" in message


def test_corrupt_weights_are_model_corrupt(tmp_path: Path) -> None:
    bad = tmp_path / "mlsd_tiny" / "mlsd_tiny_512.onnx"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\0" * mlsd_mod.MLSD_TINY.size)  # right name and size, wrong bytes
    with pytest.raises(ModelCorrupt, match="mlsd_tiny"):
        _run(np.zeros((64, 64, 3), np.uint8), {}, ModelStore(tmp_path, allow_download=False))
