"""seg: the ADE20K palette, label painting, and the real DeepLabV3 ADE20K model on room.png.

The palette is pinned against entries of the published mmseg/ControlNet list, so
a shifted, reordered or BGR palette fails. The model tests use the real weights
in ../shared/models, so wrong input scaling, a transposed or flipped label map,
or an off-by-one class mapping shows up as wrong classes in wrong places.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from engine import registry
from engine.api import Engine
from engine.imageio import decode_image
from engine.models.store import ModelStore
from engine.preprocessors import seg
from engine.preprocessors._ade20k import ADE20K_CLASSES, ADE20K_PALETTE, paint, palette_lut
from engine.registry import ProcessContext
from guideflow.errors import InvalidParameter, ModelUnavailable

# Published entries (mmseg ADE20KDataset palette == ControlNet ade_palette()), RGB.
PUBLISHED = {
    "wall": (120, 120, 120),
    "building": (180, 120, 120),
    "sky": (6, 230, 230),
    "floor": (80, 50, 50),
    "ceiling": (120, 120, 80),
    "bed": (204, 5, 255),
    "windowpane": (230, 230, 230),
    "person": (150, 5, 61),
    "flag": (92, 0, 255),
}


def color_of(name: str) -> tuple[int, int, int]:
    return ADE20K_PALETTE[ADE20K_CLASSES.index(name)]


def run_seg(image: np.ndarray, store: ModelStore | None = None) -> tuple[np.ndarray, dict]:
    proc = registry.get("seg")
    ctx = ProcessContext(seed=0, models=store or ModelStore())
    out = proc.process(image, proc.validate({}), ctx)
    return out, ctx.meta


@pytest.fixture(scope="module")
def room(images_dir: Path) -> np.ndarray:
    return decode_image((images_dir / "room.png").read_bytes())


@pytest.fixture(scope="module")
def room_seg(room: np.ndarray) -> tuple[np.ndarray, dict]:
    return run_seg(room)


def mask_of(out: np.ndarray, name: str) -> np.ndarray:
    return np.all(out == np.array(color_of(name), dtype=np.uint8), axis=-1)


# --- palette -----------------------------------------------------------------------------------


def test_palette_matches_published_entries() -> None:
    assert len(ADE20K_PALETTE) == len(ADE20K_CLASSES) == 150
    assert ADE20K_PALETTE[0] == (120, 120, 120)
    assert ADE20K_PALETTE[1] == (180, 120, 120)
    assert ADE20K_PALETTE[-1] == (92, 0, 255)
    for name, rgb in PUBLISHED.items():
        assert color_of(name) == rgb, name
    assert ADE20K_CLASSES[0] == "wall" and ADE20K_CLASSES[-1] == "flag"
    assert len(set(ADE20K_CLASSES)) == 150


def test_palette_colours_distinct_except_the_published_duplicate() -> None:
    """149 distinct colours: the published list gives road and skyscraper the same grey."""
    counts = Counter(ADE20K_PALETTE)
    duplicates = {rgb: n for rgb, n in counts.items() if n > 1}
    assert duplicates == {(140, 140, 140): 2}
    assert color_of("road") == color_of("skyscraper") == (140, 140, 140)
    assert len(counts) == 149
    assert (0, 0, 0) not in counts  # black is free for "other"
    assert all(0 <= c <= 255 for rgb in ADE20K_PALETTE for c in rgb)


def test_paint_maps_every_class_id_exactly() -> None:
    labels = np.arange(151, dtype=np.uint8).reshape(1, 151).repeat(3, axis=0)
    out = paint(labels)
    assert out.shape == (3, 151, 3) and out.dtype == np.uint8
    assert tuple(out[1, 0]) == (0, 0, 0)  # class 0 "other" is black
    for cls in range(1, 151):
        assert tuple(out[2, cls]) == ADE20K_PALETTE[cls - 1]
    assert palette_lut().shape == (151, 3)
    with pytest.raises(ValueError):
        paint(np.array([[151]], dtype=np.int32))


def test_labels_from_logits_keeps_orientation_and_uses_nearest() -> None:
    """Quadrant classes survive argmax + nearest resize to a non-square size, unblended."""
    logits = np.zeros((1, 4, 6, 151), dtype=np.float32)
    logits[0, :2, :3, 4] = 5.0  # top-left floor (class id 4)
    logits[0, :2, 3:, 6] = 5.0  # top-right ceiling (6)
    logits[0, 2:, :3, 3] = 5.0  # bottom-left sky (3)
    logits[0, 2:, 3:, 0] = 5.0  # bottom-right other (0)
    labels = seg.labels_from_logits(logits, width=12, height=8)
    assert labels.shape == (8, 12)
    assert set(np.unique(labels)) == {0, 3, 4, 6}
    assert np.all(labels[:4, :6] == 4) and np.all(labels[:4, 6:] == 6)
    assert np.all(labels[4:, :6] == 3) and np.all(labels[4:, 6:] == 0)


def test_class_fractions_lists_large_classes_in_order() -> None:
    labels = np.zeros((10, 10), dtype=np.uint8)
    labels[:5] = 1  # wall 50%
    labels[5:8] = 4  # floor 30%
    labels[8, 0] = 8  # bed 1%
    fractions = seg.class_fractions(labels, min_fraction=0.01)
    assert list(fractions) == ["wall", "floor", "bed"]
    assert fractions == {"wall": 0.5, "floor": 0.3, "bed": 0.01}


def test_deeplab_input_scaling() -> None:
    img = np.zeros((40, 30, 3), dtype=np.uint8)
    img[..., 0] = 255
    x = seg.deeplab_input(img)
    assert x.shape == (1, 513, 513, 3) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, 100, 100], [1.0, -1.0, -1.0], atol=1e-6)


# --- real model --------------------------------------------------------------------------------


def test_room_finds_wall_floor_bed_ceiling_in_palette_colours(
    room: np.ndarray, room_seg: tuple[np.ndarray, dict]
) -> None:
    out, meta = room_seg
    assert out.shape == room.shape and out.dtype == np.uint8
    for name in ("wall", "floor", "bed", "ceiling"):
        share = mask_of(out, name).mean()
        assert share >= 0.03, f"{name}: {share:.3f}"
        assert meta["seg_classes"][name] == pytest.approx(share, abs=1e-3)
    allowed = {(0, 0, 0), *ADE20K_PALETTE}
    codes = np.unique(
        out[..., 0].astype(np.int64) << 16 | out[..., 1].astype(np.int64) << 8 | out[..., 2]
    )
    colours = {(int(c) >> 16, int(c) >> 8 & 255, int(c) & 255) for c in codes}
    assert colours <= allowed


def test_room_ceiling_above_floor(room_seg: tuple[np.ndarray, dict]) -> None:
    """Spatial sanity that a flipped or transposed label map fails."""
    out, _ = room_seg
    h = out.shape[0]
    ceiling_rows = np.nonzero(mask_of(out, "ceiling"))[0]
    floor_rows = np.nonzero(mask_of(out, "floor"))[0]
    assert ceiling_rows.mean() < 0.3 * h
    assert floor_rows.mean() > 0.6 * h
    # the ceiling spans the image width (a transposed map would make it a column)
    cols = np.nonzero(mask_of(out[: h // 5], "ceiling"))[1]
    assert cols.max() - cols.min() > 0.8 * out.shape[1]


def test_non_square_output_size_preserved(room: np.ndarray) -> None:
    small = cv2.resize(room, (320, 200), interpolation=cv2.INTER_AREA)  # wider than tall
    out, meta = run_seg(small)
    assert out.shape == (200, 320, 3)
    assert mask_of(out, "ceiling").mean() > 0.03 and mask_of(out, "floor").mean() > 0.03
    assert (
        np.nonzero(mask_of(out, "ceiling"))[0].mean() < np.nonzero(mask_of(out, "floor"))[0].mean()
    )
    assert "wall" in meta["seg_classes"]


def test_engine_end_to_end_png(photo_bytes) -> None:
    guide = Engine(models=ModelStore()).preprocess(
        photo_bytes("room.png"), "seg", output_format="PNG"
    )
    decoded = cv2.cvtColor(cv2.imdecode(np.frombuffer(guide.data, np.uint8), 1), cv2.COLOR_BGR2RGB)
    assert decoded.shape == (guide.height, guide.width, 3)
    np.testing.assert_array_equal(decoded, guide.array)  # PNG is lossless: palette colours exact
    assert guide.variant == "deeplabv3"
    assert {"wall", "bed", "ceiling", "floor"} <= set(guide.meta["seg_classes"])


# --- settings and model errors -----------------------------------------------------------------


def test_settings_validation() -> None:
    proc = registry.get("seg")
    assert proc.validate({}) == {"variant": "deeplabv3"}
    with pytest.raises(InvalidParameter) as exc:
        proc.validate({"variant": "segformer"})
    assert exc.value.parameter == "variant"
    with pytest.raises(InvalidParameter) as exc:
        proc.validate({"detectResolution": 512})
    assert exc.value.parameter == "detectResolution"


def test_missing_weights_is_model_unavailable(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, allow_download=False)
    with pytest.raises(ModelUnavailable) as exc:
        run_seg(np.zeros((32, 48, 3), dtype=np.uint8), store)
    assert "deeplabv3_mnv2_ade20k.onnx" in exc.value.message
    assert registry.get("seg").models("deeplabv3") == (seg.DEEPLAB_ADE20K,)
