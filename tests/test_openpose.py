"""openpose: ControlNet's drawing style, MoveNet on real photos, and the DWPose pipeline.

* Drawing is checked pixel by pixel on people with known coordinates against the
  values ControlNet 1.1's ``draw_bodypose``/``draw_handpose``/``draw_facepose``
  produce (limbs at 60% of their colour, keypoints full colour, black elsewhere).
* MoveNet runs the real int8 weights from ../shared/models on human.png and room.png.
* DWPose's real weights are not available here, so tiny ONNX graphs with the real
  I/O signatures stand in for them (stated in each test):
  YOLOX-L ``images`` float32 ``1×3×640×640`` → ``output`` float32 ``1×8400×85``
  (raw head: x, y, log w, log h per grid cell on strides 8/16/32, objectness,
  80 class scores); DWPose-L ``input`` float32 ``1×3×384×288`` → ``simcc_x``
  ``1×133×576`` and ``simcc_y`` ``1×133×768``. The graphs are built so that the
  right answer is known: a fixed person box, SimCC maps that peak where a red
  mark lies in the crop, or at chosen bins.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from onnx import helper

from engine import registry
from engine.api import Engine
from engine.imageio import decode_image
from engine.models.store import ModelStore
from engine.preprocessors import openpose
from engine.preprocessors._pose_draw import (
    BODY_COLORS,
    BODY_KEYPOINTS,
    LIMB_SEQ,
    Person,
    draw_pose,
)
from engine.registry import ProcessContext
from guideflow.errors import InvalidParameter, ModelUnavailable
from tests.onnx_graphs import const, install, make_model, value_info

#: uint8(c * 0.6) for the channel values ControlNet's body colours use.
DIMMED = {0: 0, 85: 51, 170: 102, 255: 153}
BLACK = (0, 0, 0)


def dim(color: tuple[int, int, int]) -> tuple[int, ...]:
    return tuple(DIMMED[c] for c in color)


def px(img: np.ndarray, x: float, y: float) -> tuple[int, ...]:
    return tuple(int(v) for v in img[int(y), int(x)])


def person_at(points: dict[str, tuple[float, float]]) -> Person:
    body = np.full((18, 2), np.nan)
    for name, xy in points.items():
        body[BODY_KEYPOINTS.index(name)] = xy
    return Person(body=body, body_scores=np.isfinite(body[:, 0]).astype(float))


def run(
    image: np.ndarray, settings: dict, store: ModelStore | None = None
) -> tuple[np.ndarray, dict]:
    proc = registry.get("openpose")
    ctx = ProcessContext(seed=0, models=store or ModelStore())
    return proc.process(image, proc.validate(settings), ctx), ctx.meta


# --- drawing on known keypoints ----------------------------------------------------------------

SKELETON = {  # a spread-out person on a 400×400 canvas, every limb ≥ 40 px long
    "nose": (200, 80), "neck": (200, 140),
    "right_shoulder": (140, 140), "right_elbow": (100, 200), "right_wrist": (80, 270),
    "left_shoulder": (260, 140), "left_elbow": (300, 200), "left_wrist": (320, 270),
    "right_hip": (170, 260), "right_knee": (160, 320), "right_ankle": (150, 390),
    "left_hip": (230, 260), "left_knee": (240, 320), "left_ankle": (250, 390),
    "right_eye": (180, 60), "left_eye": (220, 60), "right_ear": (140, 50), "left_ear": (260, 50),
}  # fmt: skip


def segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    t = np.clip(((p - a) @ ab) / (ab @ ab), 0.0, 1.0)
    return np.linalg.norm(p - (a + t[:, None] * ab), axis=1)


def test_body_drawing_matches_controlnet_style() -> None:
    person = person_at(SKELETON)
    img = draw_pose([person], 400, 400)
    assert img.shape == (400, 400, 3) and img.dtype == np.uint8
    # keypoint centres: full colour (circles are drawn after the 60% dimming)
    for i, name in enumerate(BODY_KEYPOINTS):
        x, y = SKELETON[name]
        assert px(img, x, y) == BODY_COLORS[i], name
        assert px(img, x + 3, y) == BODY_COLORS[i], name  # radius 4
    # limb midpoints and 3 px across the limb: 60% of the limb's colour
    for i, (a, b) in enumerate(LIMB_SEQ):
        pa, pb = np.array(SKELETON[BODY_KEYPOINTS[a]]), np.array(SKELETON[BODY_KEYPOINTS[b]])
        mid = (pa + pb) / 2
        normal = np.array([-(pb - pa)[1], (pb - pa)[0]]) / np.linalg.norm(pb - pa)
        assert px(img, *mid) == dim(BODY_COLORS[i]), f"limb {i}"
        assert px(img, *(mid + 2 * normal)) == dim(BODY_COLORS[i]), f"limb {i} width"
    # nothing farther from the skeleton than the stick half-width / circle radius (+1 px)
    ys, xs = np.nonzero(img.any(axis=-1))
    pts = np.stack([xs, ys], axis=1).astype(float)
    nearest = np.full(len(pts), np.inf)
    for a, b in LIMB_SEQ:
        pa, pb = (
            np.array(SKELETON[BODY_KEYPOINTS[a]], float),
            np.array(SKELETON[BODY_KEYPOINTS[b]], float),
        )
        nearest = np.minimum(nearest, segment_distance(pts, pa, pb))
    assert nearest.max() <= 5.5
    assert px(img, 5, 5) == BLACK and px(img, 395, 200) == BLACK


def test_missing_keypoints_draw_nothing_and_limbs_need_both_ends() -> None:
    img = draw_pose(
        [person_at({"neck": (100, 100), "right_shoulder": (40, 100), "nose": (100, 40)})], 200, 200
    )
    assert px(img, 70, 100) == dim(BODY_COLORS[0])  # neck→r_shoulder
    assert px(img, 100, 70) == dim(BODY_COLORS[12])  # neck→nose
    nothing = draw_pose([person_at({"neck": (100, 100)})], 200, 200)
    assert px(nothing, 100, 100) == BODY_COLORS[1]
    assert np.count_nonzero(nothing.any(axis=-1)) < 60  # one r=4 disc, no limbs
    assert not draw_pose([], 50, 80).any()


def test_later_limbs_overwrite_earlier_ones_before_dimming() -> None:
    """Two crossing limbs: the later one in LIMB_SEQ wins, both at 60% (no alpha stacking)."""
    a = person_at({"neck": (50, 100), "right_shoulder": (150, 100)})  # limb 0, horizontal
    b = person_at({"neck": (100, 50), "right_hip": (100, 150)})  # limb 6, vertical
    img = draw_pose([a, b], 200, 200)
    assert px(img, 100, 100) == dim(BODY_COLORS[6])
    assert px(img, 70, 100) == dim(BODY_COLORS[0])


#: A hand with wrist at (100, 200): thumb up, index finger right, middle finger down,
#: ring and little finger not found. Points are 20 px apart, so edge midpoints are
#: 10 px from any point disc.
HAND = np.full((21, 2), np.nan)
HAND[0] = (100, 200)
HAND[1:5] = [(100, 180), (100, 160), (100, 140), (100, 120)]
HAND[5:9] = [(120, 200), (140, 200), (160, 200), (180, 200)]
HAND[9:13] = [(100, 220), (100, 240), (100, 260), (100, 280)]

#: Edge index → (midpoint, colour): hue e/20 at full saturation and value, × 255.
HAND_EDGE_PIXELS = {
    0: ((100, 190), (255, 0, 0)),  # hue 0
    2: ((100, 150), (255, 153, 0)),  # hue 0.1
    4: ((110, 200), (204, 255, 0)),  # hue 0.2
    6: ((150, 200), (51, 255, 0)),  # hue 0.3
    8: ((100, 210), (0, 255, 102)),  # hue 0.4
    10: ((100, 250), (0, 255, 255)),  # hue 0.5
}


def test_hands_and_face_drawing() -> None:
    face = np.array([[300.0, 50.0], [330.0, 50.0], [0.5, 60.0], [np.nan, np.nan]])
    person = person_at({"neck": (300, 300)})
    person.hands = [HAND]
    person.face = face
    img = draw_pose([person], 400, 400, hands_and_face=True)
    for e, ((x, y), color) in HAND_EDGE_PIXELS.items():
        assert px(img, x, y) == color, f"edge {e}"
    for x, y in HAND[:13]:  # every found point: a blue disc of radius 4
        assert px(img, x, y) == (0, 0, 255)
        assert px(img, x + 3, y) == (0, 0, 255)
    assert not img[195:206, 60:95].any()  # ring/little finger missing: no edges, no discs
    # face: white dots of radius 3; the point at x < 1 is skipped, as ControlNet skips it
    assert px(img, 300, 50) == (255, 255, 255) and px(img, 302, 50) == (255, 255, 255)
    assert px(img, 305, 50) == BLACK
    assert not img[55:66, 0:5].any()
    assert px(img, 300, 300) == BODY_COLORS[1]
    # without the flag neither is drawn
    body_only = draw_pose([person], 400, 400, hands_and_face=False)
    assert not body_only[:290].any()


# --- MoveNet on real photos --------------------------------------------------------------------


@pytest.fixture(scope="module")
def human(images_dir: Path) -> np.ndarray:
    return decode_image((images_dir / "human.png").read_bytes())


@pytest.fixture(scope="module")
def human_people(human: np.ndarray) -> list[Person]:
    return openpose.detect(human, variant="movenet")


def test_movenet_finds_one_person_with_plausible_geometry(
    human: np.ndarray, human_people: list[Person]
) -> None:
    """human.png: a man facing the camera, head top-centre, torso to the bottom edge."""
    h, w = human.shape[:2]
    assert len(human_people) == 1
    p = human_people[0]
    for name in ("nose", "right_eye", "left_eye", "right_shoulder", "left_shoulder", "neck"):
        assert p.has(BODY_KEYPOINTS.index(name)), name
    nose, r_sho, l_sho = p.point("nose"), p.point("right_shoulder"), p.point("left_shoulder")
    # the face is in the top-centre of the photo
    assert 0.35 * w < nose[0] < 0.6 * w and 0.15 * h < nose[1] < 0.35 * h
    # eyes above the nose, nose above the shoulders (image y grows downwards)
    assert p.point("right_eye")[1] < nose[1] and p.point("left_eye")[1] < nose[1]
    assert nose[1] < min(r_sho[1], l_sho[1]) - 0.1 * h
    # facing the camera: the person's right shoulder is on the image's left
    assert r_sho[0] < nose[0] < l_sho[0]
    np.testing.assert_array_equal(p.point("neck"), (r_sho + l_sho) / 2)
    for i in range(18):  # hips where visible lie below the shoulders
        if p.has(i) and BODY_KEYPOINTS[i].endswith("hip"):
            assert p.body[i][1] > max(r_sho[1], l_sho[1])
    found = p.body[np.isfinite(p.body[:, 0])]
    assert np.all(found >= -1) and np.all(found[:, 0] <= w + 1) and np.all(found[:, 1] <= h + 1)
    # legs are out of frame: knees and ankles are not reported
    for name in ("right_knee", "left_knee", "right_ankle", "left_ankle"):
        assert not p.has(BODY_KEYPOINTS.index(name)), name


def test_movenet_drawing_has_limb_colours_where_the_limbs_are(
    human: np.ndarray, human_people: list[Person]
) -> None:
    out, meta = run(human, {"variant": "movenet"})
    assert out.shape == human.shape and meta == {"people": 1, "keypointThreshold": 0.4}
    p = human_people[0]
    neck, r_sho, l_sho = p.point("neck"), p.point("right_shoulder"), p.point("left_shoulder")
    assert px(out, *((neck + r_sho) / 2)) == dim(BODY_COLORS[0])  # neck→r_shoulder
    assert px(out, *((neck + l_sho) / 2)) == dim(BODY_COLORS[1])  # neck→l_shoulder
    assert px(out, *neck) == BODY_COLORS[1]
    assert px(out, *p.point("nose")) == BODY_COLORS[0]
    np.testing.assert_array_equal(out, draw_pose(human_people, *human.shape[:2]))
    assert 0.002 < out.any(axis=-1).mean() < 0.1  # a skeleton, not a filled picture


def test_movenet_finds_nobody_in_an_empty_room(images_dir: Path) -> None:
    room = decode_image((images_dir / "room.png").read_bytes())
    assert openpose.detect(room, variant="movenet") == []
    out, meta = run(room, {"variant": "movenet"})
    assert out.shape == room.shape and not out.any()
    assert meta["people"] == 0


def test_movenet_threshold_controls_what_counts(human: np.ndarray) -> None:
    everything = openpose.detect(human, variant="movenet", threshold=0.0)
    assert len(everything) == 1 and np.all(np.isfinite(everything[0].body))
    assert openpose.detect(human, variant="movenet", threshold=0.99) == []


def test_movenet_input_pads_top_left_to_a_square() -> None:
    img = np.full((60, 120, 3), 200, dtype=np.uint8)  # wide: padding goes below
    x, side = openpose.movenet_input(img)
    assert side == 120 and x.shape == (1, 192, 192, 3) and x.dtype == np.uint8
    assert np.all(x[0, :90] == 200) and np.all(x[0, 100:] == 0)


# --- settings ----------------------------------------------------------------------------------


def test_movenet_with_hands_and_face_is_invalid_parameter() -> None:
    proc = registry.get("openpose")
    with pytest.raises(InvalidParameter) as exc:
        proc.validate({"variant": "movenet", "includeHandsAndFaceOpenPose": True})
    assert exc.value.parameter == "includeHandsAndFaceOpenPose"
    assert "movenet" in exc.value.message and "body" in exc.value.message
    with pytest.raises(InvalidParameter):
        Engine().prepare("openpose", {"variant": "movenet", "includeHandsAndFaceOpenPose": "true"})
    assert proc.validate({"variant": "movenet", "includeHandsAndFaceOpenPose": False})


def test_settings_defaults_and_ranges() -> None:
    proc = registry.get("openpose")
    assert proc.validate({}) == {
        "variant": "dwpose",
        "includeHandsAndFaceOpenPose": False,
        "keypointThreshold": None,
    }
    with pytest.raises(InvalidParameter) as exc:
        proc.validate({"keypointThreshold": 1.5})
    assert exc.value.parameter == "keypointThreshold"
    with pytest.raises(InvalidParameter) as exc:
        proc.validate({"variant": "openpose_full"})
    assert exc.value.parameter == "variant"
    assert [m.name for m in proc.models("dwpose")] == ["dwpose_yolox_l", "dwpose_ll_ucoco_384"]
    assert [m.name for m in proc.models("movenet")] == ["movenet_singlepose_lightning_int8"]
    pins = {m.filename: (m.repo_id, m.revision, m.sha256[:8]) for m in proc.models("dwpose")}
    assert pins["yolox_l.onnx"] == ("yzd-v/DWPose", openpose.DWPOSE_REVISION, "7860ae79")
    assert pins["dw-ll_ucoco_384.onnx"] == ("yzd-v/DWPose", openpose.DWPOSE_REVISION, "724f4ff2")


# --- DWPose pipeline with stand-in graphs ------------------------------------------------------

IMAGE_W, IMAGE_H = 400, 300
#: The person box the stand-in detector reports, in image pixels (x1, y1, x2, y2).
BOX = (100.0, 40.0, 260.0, 280.0)
#: Worked by hand: centre (180, 160); size ×1.25 = 200×300; widened to 3:4 → 225×300.
CROP_X0, CROP_Y0, CROP_W, CROP_H = 67.5, 10.0, 225.0, 300.0
LETTERBOX = 1.6  # min(640/300, 640/400)


def yolox_row(box: tuple[float, float, float, float], stride: int, obj: float, cls: list[float]):
    """(anchor index, 85 raw values) putting ``box`` (image pixels) on a cell of ``stride``."""
    x1, y1, x2, y2 = (v * LETTERBOX for v in box)
    cx, cy, bw, bh = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
    gx, gy = int(cx // stride), int(cy // stride)
    offset = {8: 0, 16: 80 * 80, 32: 80 * 80 + 40 * 40}[stride]
    row = np.zeros(85, dtype=np.float32)
    row[:4] = [cx / stride - gx, cy / stride - gy, math.log(bw / stride), math.log(bh / stride)]
    row[4] = obj
    row[5 : 5 + len(cls)] = cls
    return offset + gy * (640 // stride) + gx, row


def detector_graph(rows: list[tuple[int, np.ndarray]]) -> bytes:
    """Stand-in YOLOX-L: a constant raw head (``output`` = table + 0 × mean(images))."""
    table = np.zeros((1, 8400, 85), dtype=np.float32)
    for index, row in rows:
        table[0, index] = row
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["m"], keepdims=0),
        helper.make_node("Mul", ["m", "zero"], ["z"]),
        helper.make_node("Add", ["table", "z"], ["output"]),
    ]
    return make_model(
        nodes,
        [value_info("images", np.float32, [1, 3, 640, 640])],
        [value_info("output", np.float32, [1, 8400, 85])],
        [const("table", table), const("zero", np.array(0.0, dtype=np.float32))],
    )


def red_tracking_pose_graph() -> bytes:
    """Stand-in DWPose-L whose 133 keypoints all sit on the reddest spot of the crop.

    ``simcc_x[k, 2c] = simcc_x[k, 2c+1] = max over rows of channel 0 (R) at column c``,
    ``simcc_y`` likewise over columns, so the argmax bin / 2 is the crop pixel of the
    red mark; its value (normalised R) is the score.
    """
    nodes = [
        helper.make_node("Slice", ["input", "c0", "c1", "ax1"], ["red"]),  # 1×1×384×288
        helper.make_node("ReduceMax", ["red"], ["colmax"], axes=[2], keepdims=0),  # 1×1×288
        helper.make_node("ReduceMax", ["red"], ["rowmax"], axes=[3], keepdims=0),  # 1×1×384
        helper.make_node("Unsqueeze", ["colmax", "ax3"], ["cu"]),
        helper.make_node("Concat", ["cu", "cu"], ["cc"], axis=3),
        helper.make_node("Reshape", ["cc", "shape_x1"], ["cx"]),  # 1×1×576
        helper.make_node("Expand", ["cx", "shape_x"], ["simcc_x"]),
        helper.make_node("Unsqueeze", ["rowmax", "ax3"], ["ru"]),
        helper.make_node("Concat", ["ru", "ru"], ["rc"], axis=3),
        helper.make_node("Reshape", ["rc", "shape_y1"], ["ry"]),  # 1×1×768
        helper.make_node("Expand", ["ry", "shape_y"], ["simcc_y"]),
    ]
    i64 = np.int64
    inits = [
        const("c0", np.array([0], i64)),
        const("c1", np.array([1], i64)),
        const("ax1", np.array([1], i64)),
        const("ax3", np.array([3], i64)),
        const("shape_x1", np.array([1, 1, 576], i64)),
        const("shape_y1", np.array([1, 1, 768], i64)),
        const("shape_x", np.array([1, 133, 576], i64)),
        const("shape_y", np.array([1, 133, 768], i64)),
    ]
    return make_model(
        nodes,
        [value_info("input", np.float32, [1, 3, 384, 288])],
        [
            value_info("simcc_x", np.float32, [1, 133, 576]),
            value_info("simcc_y", np.float32, [1, 133, 768]),
        ],
        inits,
    )


def fixed_pose_graph(bins_x: np.ndarray, bins_y: np.ndarray, peaks: np.ndarray) -> bytes:
    """Stand-in DWPose-L with constant SimCC maps: keypoint k peaks at (bins_x[k], bins_y[k])."""
    sx = np.zeros((1, 133, 576), dtype=np.float32)
    sy = np.zeros((1, 133, 768), dtype=np.float32)
    sx[0, np.arange(133), bins_x] = peaks
    sy[0, np.arange(133), bins_y] = peaks
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["m"], keepdims=0),
        helper.make_node("Mul", ["m", "zero"], ["z"]),
        helper.make_node("Add", ["sx", "z"], ["simcc_x"]),
        helper.make_node("Add", ["sy", "z"], ["simcc_y"]),
    ]
    return make_model(
        nodes,
        [value_info("input", np.float32, [1, 3, 384, 288])],
        [
            value_info("simcc_x", np.float32, [1, 133, 576]),
            value_info("simcc_y", np.float32, [1, 133, 768]),
        ],
        [const("sx", sx), const("sy", sy), const("zero", np.array(0.0, dtype=np.float32))],
    )


def person_rows() -> list[tuple[int, np.ndarray]]:
    """The person box twice (strides 32 and 16, NMS must merge), plus boxes that must be ignored."""
    return [
        yolox_row(BOX, 32, obj=0.9, cls=[0.95]),
        yolox_row(BOX, 16, obj=0.8, cls=[0.9]),  # same box, lower score: suppressed
        yolox_row((300, 10, 390, 100), 8, obj=0.9, cls=[0.1, 0.9]),  # a non-person class
        yolox_row((10, 150, 60, 290), 16, obj=0.5, cls=[0.5]),  # person at 0.25 < 0.3
    ]


@pytest.fixture()
def dwpose_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Install stand-in graphs under the real DWPose specs' names in a temp models dir."""

    def _install(detector: bytes, pose: bytes | None) -> ModelStore:
        monkeypatch.setattr(openpose, "YOLOX_L", install(tmp_path, openpose.YOLOX_L, detector))
        if pose is not None:
            monkeypatch.setattr(openpose, "DWPOSE_LL", install(tmp_path, openpose.DWPOSE_LL, pose))
        return ModelStore(tmp_path, allow_download=False)

    return _install


def marked_image() -> np.ndarray:
    """Black 400×300 with a 3×3 red mark at (150, 100) and a blue decoy at (230, 220)."""
    img = np.zeros((IMAGE_H, IMAGE_W, 3), dtype=np.uint8)
    img[99:102, 149:152] = (255, 0, 0)
    img[219:222, 229:232] = (0, 0, 255)
    return img


def test_yolox_decoding_letterbox_and_nms(dwpose_store) -> None:
    """Stand-in detector graph (fixed raw head): one person box comes back, in image pixels."""
    store = dwpose_store(detector_graph(person_rows()), None)
    boxes = openpose.detect_people_boxes(marked_image(), store)
    assert boxes.shape == (1, 4)
    np.testing.assert_allclose(boxes[0], BOX, atol=1e-3)


def test_dwpose_crop_and_simcc_decode_land_on_the_mark(dwpose_store) -> None:
    """Stand-in graphs: the pose graph tracks the red mark inside the 288×384 crop.

    Every keypoint must come back at the mark's image position, which only happens
    when the box → crop affine, its inverse, the RGB order (the blue decoy would win
    on BGR input), the normalisation sign and the SimCC /2 decode are all right.
    """
    store = dwpose_store(detector_graph(person_rows()), red_tracking_pose_graph())
    people = openpose.detect(marked_image(), variant="dwpose", models=store)
    assert len(people) == 1
    p = people[0]
    assert np.all(np.isfinite(p.body))
    np.testing.assert_allclose(p.body, np.tile([150.0, 100.0], (18, 1)), atol=2.0)
    for hand in p.hands:
        np.testing.assert_allclose(hand, np.tile([150.0, 100.0], (21, 1)), atol=2.0)
    assert p.face is not None and p.face.shape == (68, 2)
    np.testing.assert_allclose(p.face, np.tile([150.0, 100.0], (68, 1)), atol=2.0)


def test_dwpose_wholebody_mapping_and_threshold(dwpose_store) -> None:
    """Stand-in graphs: keypoint k peaks at crop pixel (2k, 2.5k) → known image points."""
    k = np.arange(133)
    peaks = np.full(133, 0.9, dtype=np.float32)
    peaks[13] = 0.25  # COCO left knee: below DWPose's 0.3
    peaks[100] = 0.1  # a left-hand point
    store = dwpose_store(detector_graph(person_rows()), fixed_pose_graph(4 * k, 5 * k, peaks))
    (p,) = openpose.detect(marked_image(), variant="dwpose", models=store)

    def expected(i: int) -> np.ndarray:  # crop (2i, 2.5i) → image, with the hand-worked crop
        return np.array([CROP_X0 + 2 * i * CROP_W / 288, CROP_Y0 + 2.5 * i * CROP_H / 384])

    coco_of = {"nose": 0, "left_eye": 1, "right_eye": 2, "left_ear": 3, "right_ear": 4,
               "left_shoulder": 5, "right_shoulder": 6, "left_elbow": 7, "right_elbow": 8,
               "left_wrist": 9, "right_wrist": 10, "left_hip": 11, "right_hip": 12,
               "right_knee": 14, "left_ankle": 15, "right_ankle": 16}  # fmt: skip
    for name, i in coco_of.items():
        np.testing.assert_allclose(p.point(name), expected(i), atol=1e-3, err_msg=name)
    assert not p.has(BODY_KEYPOINTS.index("left_knee"))
    np.testing.assert_allclose(p.point("neck"), (expected(5) + expected(6)) / 2, atol=1e-3)
    left, right = p.hands
    np.testing.assert_allclose(left[0], expected(91), atol=1e-3)
    np.testing.assert_allclose(right[20], expected(132), atol=1e-3)
    assert np.all(np.isnan(left[100 - 91]))
    assert p.face is not None
    np.testing.assert_allclose(p.face[0], expected(23), atol=1e-3)
    np.testing.assert_allclose(p.face[67], expected(90), atol=1e-3)


def test_dwpose_process_draws_hands_and_face_only_when_asked(dwpose_store) -> None:
    """Stand-in graphs as above; the guide image follows the includeHandsAndFaceOpenPose flag."""
    k = np.arange(133)
    store = dwpose_store(
        detector_graph(person_rows()),
        fixed_pose_graph(4 * k, 5 * k, np.full(133, 0.9, dtype=np.float32)),
    )
    body, meta = run(marked_image(), {}, store)
    full, _ = run(marked_image(), {"includeHandsAndFaceOpenPose": True}, store)
    assert meta == {"people": 1, "keypointThreshold": 0.3}
    white = np.all(full == 255, axis=-1)
    blue = np.all(full == (0, 0, 255), axis=-1)
    assert white.any() and blue.any()  # face dots, hand points
    assert not np.all(body == 255, axis=-1).any()
    assert body.any() and body.shape == (IMAGE_H, IMAGE_W, 3)


def test_dwpose_nobody_found_is_black_and_skips_the_pose_model(dwpose_store) -> None:
    """Stand-in detector that sees nobody; no pose model is installed, and none is needed."""
    store = dwpose_store(detector_graph([]), None)
    out, meta = run(marked_image(), {"includeHandsAndFaceOpenPose": True}, store)
    assert not out.any() and meta["people"] == 0


def test_dwpose_weights_missing_is_model_unavailable(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, allow_download=False)
    with pytest.raises(ModelUnavailable) as exc:
        run(marked_image(), {}, store)
    assert "yolox_l.onnx" in exc.value.message
