"""softedge and scribble on real photos with the real PiDiNet weights in ../shared/models.

HED has no real weights here: its tests use a tiny ONNX graph with the I/O documented in
``engine/preprocessors/softedge.py`` (input ``input`` float32 [1,3,H,W] RGB 0..255, five
side-output logit maps at 1, 1/2, 1/4, 1/8 and 1/16 scale); see :func:`_tiny_hed_graph`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from onnx import helper

from engine import registry
from engine.imageio import decode_image
from engine.models.onnx import session_for
from engine.models.store import ModelStore
from engine.preprocessors import scribble as scribble_mod
from engine.preprocessors import softedge as softedge_mod
from engine.registry import ProcessContext
from guideflow.errors import InvalidParameter, ModelCorrupt, ModelUnavailable
from tests.onnx_graphs import const, install, make_model, value_info


def _run(
    name: str, image: np.ndarray, settings: dict[str, Any], store: ModelStore
) -> tuple[np.ndarray, dict[str, Any]]:
    proc = registry.get(name)
    ctx = ProcessContext(seed=0, models=store)
    out = proc.process(image, proc.validate(settings), ctx)
    assert out.dtype == np.uint8 and out.shape == (*image.shape[:2], 3)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all()
    return out[..., 0], ctx.meta


@pytest.fixture(scope="module")
def store(models_dir: Path) -> ModelStore:
    return ModelStore(models_dir, allow_download=False)


@pytest.fixture(scope="module")
def room(images_dir: Path) -> np.ndarray:
    return decode_image((images_dir / "room.png").read_bytes())


@pytest.fixture(scope="module")
def canny_near(room: np.ndarray):
    """Mask of pixels within ``r`` px of a Canny edge of room.png."""
    edges = cv2.Canny(cv2.cvtColor(room, cv2.COLOR_RGB2GRAY), 100, 200)

    def near(r: int) -> np.ndarray:
        return cv2.dilate(edges, np.ones((2 * r + 1, 2 * r + 1), np.uint8)) > 0

    return near


@pytest.fixture(scope="module")
def soft(room: np.ndarray, store: ModelStore) -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
    """The softedge maps of room.png, computed once per module (PiDiNet takes ~0.5 s)."""
    return {
        "pidinet": _run("softedge", room, {}, store),
        "pidinet_tiny": _run("softedge", room, {"pidinetModel": "tiny"}, store),
        "pidinet_safe": _run("softedge", room, {"variant": "pidinet_safe"}, store),
    }


# -- softedge, PiDiNet ------------------------------------------------------------------------


def test_softedge_edges_sit_on_real_boundaries(soft, canny_near) -> None:
    """Strong soft edges lie near Canny edges; areas far from any edge (flat wall) are dark."""
    edge, meta = soft["pidinet"]
    assert meta["model"] == "pidinet_small"
    strong = edge > 128
    near = canny_near(3)
    share = (strong & near).sum() / strong.sum()
    # Measured 0.76 while the 3-px band covers only 30 % of the image.
    assert share > 0.65 and share > 2 * near.mean()
    far = ~canny_near(15)
    assert far.mean() > 0.2  # there is flat wall/floor to look at
    assert edge[far].mean() < 30  # measured 14
    assert 0.1 < strong.mean() < 0.35  # measured 0.21: edges, not a blank or a filled map


def test_softedge_is_soft_and_in_expected_band(soft) -> None:
    """The plain variant keeps many grey levels; its mean brightness is as measured once.

    Measured on room.png: mean 55.2 with the documented ImageNet-normalised RGB input; the
    same weights fed unnormalised /255 give 48.0, so the band catches that mistake.
    """
    edge, _ = soft["pidinet"]
    assert len(np.unique(edge)) > 150
    assert ((edge > 20) & (edge < 235)).mean() > 0.15  # a real share of intermediate greys
    assert 51.0 < edge.mean() < 60.0


def test_softedge_matches_documented_preprocessing(room, soft, store) -> None:
    """The output equals PiDiNet run by hand with the README's I/O, and not a BGR variant.

    Independent reference: RGB/255, ImageNet mean/std, NCHW, output '956', at the detect
    size, resized back bilinearly. The BGR-fed reference differs visibly (measured: 16 % of
    pixels by more than 8 levels), so this check would catch a channel swap.
    """
    edge, meta = soft["pidinet"]
    sess = session_for(softedge_mod.PIDINET_SMALL, store)
    dw, dh = meta["detectSize"]
    h, w = room.shape[:2]
    small = cv2.resize(room, (dw, dh), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)

    def reference(x: np.ndarray) -> np.ndarray:
        nchw = np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)
        (out,) = sess.run(["956"], {"input": nchw})
        back = cv2.resize(out[0, 0], (w, h), interpolation=cv2.INTER_LINEAR)
        return (back.clip(0, 1) * 255).round()

    good = reference((small - mean) / std)
    assert np.abs(good - edge).max() <= 1
    bgr = reference((small[..., ::-1] - mean) / std)
    assert (np.abs(bgr - edge) > 8).mean() > 0.05


def test_softedge_safe_is_quantised_to_three_levels(soft) -> None:
    """pidinet_safe is ControlNet's safe_step of the same map: exactly 0, ½ and 1."""
    plain, _ = soft["pidinet"]
    safe, _ = soft["pidinet_safe"]
    levels = set(np.unique(safe).tolist())
    assert levels == {0, 128, 255}
    # Away from the ⅓ and ⅔ cut points, the quantisation of the plain map is exact.
    assert (safe[plain < 80] == 0).all()
    assert (safe[(plain > 90) & (plain < 165)] == 128).all()
    assert (safe[plain > 175] == 255).all()


def test_both_pidinet_sizes_load_and_agree(soft) -> None:
    """pidinet_small and pidinet_tiny both run; different weights, the same edges."""
    small, meta_small = soft["pidinet"]
    tiny, meta_tiny = soft["pidinet_tiny"]
    assert (meta_small["model"], meta_tiny["model"]) == ("pidinet_small", "pidinet_tiny")
    assert not np.array_equal(small, tiny)
    corr = np.corrcoef(small.ravel().astype(float), tiny.ravel().astype(float))[0, 1]
    assert corr > 0.8


@pytest.mark.parametrize(("width", "height"), [(333, 517), (67, 45)])
def test_softedge_output_size_equals_input_for_odd_sizes(room, store, width, height) -> None:
    image = cv2.resize(room, (width, height), interpolation=cv2.INTER_AREA)
    edge, meta = _run("softedge", image, {"variant": "pidinet_safe"}, store)
    assert edge.shape == (height, width)
    dw, dh = meta["detectSize"]
    assert dw % 64 == 0 and dh % 64 == 0 and min(dw, dh) >= 512 - 32
    assert set(np.unique(edge).tolist()) <= {0, 128, 255}


def test_detect_size_follows_controlnet_rule() -> None:
    """Shorter side → 512, both sides rounded to a multiple of 64; extreme ratios capped."""
    assert softedge_mod.detect_size(564, 752) == (512, 704)
    assert softedge_mod.detect_size(1024, 1024) == (512, 512)
    assert softedge_mod.detect_size(300, 200) == (768, 512)
    w, h = softedge_mod.detect_size(40, 4000)
    assert h <= softedge_mod.MAX_DETECT_SIDE + 32 and w >= 64


# -- softedge, HED (tiny stand-in graph) ------------------------------------------------------


def _tiny_hed_graph() -> bytes:
    """A stand-in for an ONNX export of ControlNetHED_Apache2 (no real HED weights here).

    Same I/O as the real export: input ``input`` float32 [1,3,H,W] RGB 0..255, five
    logit side outputs at 1, 1/2, 1/4, 1/8, 1/16 scale. Network: ``s = (R - 128) / 16``
    (a 1×1 conv reading only the red channel, in 0..255 units), side k = average-pool of
    ``s`` by 2^k, and the last side also gets +5. On a flat region the averaged logit is
    therefore ``s + 1``; HED's post-processing makes that ``sigmoid(s + 1)``.
    """
    weight = np.zeros((1, 3, 1, 1), np.float32)
    weight[0, 0] = 1 / 16
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["side1"])]
    for k in (2, 3, 4):
        size = 2 ** (k - 1)
        nodes.append(
            helper.make_node(
                "AveragePool",
                ["side1"],
                [f"side{k}"],
                kernel_shape=[size, size],
                strides=[size, size],
            )
        )
    nodes.append(
        helper.make_node(
            "AveragePool", ["side1"], ["pool16"], kernel_shape=[16, 16], strides=[16, 16]
        )
    )
    nodes.append(helper.make_node("Add", ["pool16", "five"], ["side5"]))
    outputs = [value_info(f"side{k}", np.float32, [1, 1, None, None]) for k in range(1, 6)]
    return make_model(
        nodes,
        [value_info("input", np.float32, [1, 3, None, None])],
        outputs,
        [
            const("w", weight),
            const("b", np.array([-128 / 16], np.float32)),
            const("five", np.array(5.0, np.float32)),
        ],
    )


def _halves(left_red: int, right_red: int) -> np.ndarray:
    """96×64 RGB image: left/right halves with the given red, blue the mirror (swap guard)."""
    img = np.zeros((96, 64, 3), np.uint8)
    img[:, :32] = (left_red, 90, right_red)
    img[:, 32:] = (right_red, 90, left_red)
    return img


@pytest.fixture()
def hed_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModelStore:
    spec = install(tmp_path, softedge_mod.CONTROLNET_HED, _tiny_hed_graph())
    monkeypatch.setattr(softedge_mod, "CONTROLNET_HED", spec)
    return ModelStore(tmp_path, allow_download=False)


def test_hed_postprocessing_averages_side_logits_then_sigmoid(hed_store) -> None:
    """Tiny stand-in graph: output = sigmoid(mean of the upsampled side logits), RGB 0..255.

    Left red 144 → s = 1 → sigmoid(2) = 0.881 → 225; right red 112 → s = −1 → 0.5 → 128.
    Summing the sides instead (→ 255/255), skipping the sigmoid (→ 255/0), reading only
    the first side (→ 186/128), feeding /255 (→ ~0/~0) or BGR (→ 128/225) all fail.
    """
    edge, meta = _run("softedge", _halves(144, 112), {"variant": "hed"}, hed_store)
    assert meta["model"] == "controlnet_hed"
    left, right = edge[8:-8, 4:24], edge[8:-8, 40:60]
    assert np.abs(left.astype(int) - 225).max() <= 1
    assert np.abs(right.astype(int) - 128).max() <= 1


def test_hed_safe_and_scribble_hed(hed_store) -> None:
    """hed_safe quantises the HED map; scribble hed turns it into binary strokes.

    Left 0.881 → safe 1 (255), right 0.5 → safe ½ (128). For scribble, a right half of
    red 96 gives sigmoid(−1) = 0.27 (69, under nms's 127): left strokes, right empty.
    """
    safe, _ = _run("softedge", _halves(144, 112), {"variant": "hed_safe"}, hed_store)
    assert (safe[8:-8, 4:24] == 255).all() and (safe[8:-8, 40:60] == 128).all()
    strokes, meta = _run("scribble", _halves(144, 96), {"variant": "hed"}, hed_store)
    assert meta["model"] == "controlnet_hed"
    assert (strokes[12:-12, 4:20] == 255).all()
    assert (strokes[:, 48:] == 0).all()


def test_unpinned_hed_export_runs_without_checksum(tmp_path: Path) -> None:
    """The default HED spec is unpinned (empty sha256): a user's own export just runs."""
    assert softedge_mod.CONTROLNET_HED.sha256 == ""
    path = tmp_path / softedge_mod.CONTROLNET_HED.local_relpath()
    path.parent.mkdir(parents=True)
    path.write_bytes(_tiny_hed_graph())
    edge, _ = _run("softedge", _halves(144, 112), {"variant": "hed"}, ModelStore(tmp_path))
    assert abs(int(edge[40, 10]) - 225) <= 1


# -- missing / corrupt weights ----------------------------------------------------------------


def test_missing_weights_are_model_unavailable_with_the_fix(tmp_path: Path, room) -> None:
    empty = ModelStore(tmp_path, allow_download=False)
    with pytest.raises(ModelUnavailable) as info:
        _run("softedge", room, {}, empty)
    message = info.value.message
    assert "pidinet_small.onnx" in message
    assert str(tmp_path / "softedge_pidinet" / "pidinet_small.onnx") in message
    assert "Fix:" in message and "GUIDEFLOW_OFFLINE" in message
    with pytest.raises(ModelUnavailable, match=r"ControlNetHED\.onnx"):
        _run("scribble", room, {"variant": "hed"}, empty)


def test_corrupt_weights_are_model_corrupt(tmp_path: Path, room) -> None:
    bad = tmp_path / "softedge_pidinet" / "pidinet_tiny.onnx"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not an onnx model" * 100)
    with pytest.raises(ModelCorrupt, match="pidinet_tiny"):
        _run("softedge", room, {"pidinetModel": "tiny"}, ModelStore(tmp_path, allow_download=False))


# -- scribble ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scribble_room(room, store) -> tuple[np.ndarray, dict[str, Any]]:
    return _run("scribble", room, {}, store)


def test_scribble_is_binary_and_follows_soft_edges(soft, scribble_room) -> None:
    """Default (pidinet) scribble: only 0 and 255, strokes cover the strong soft edges."""
    strokes, meta = scribble_room
    assert meta["model"] == "pidinet_small"
    assert set(np.unique(strokes).tolist()) == {0, 255}
    edge, _ = soft["pidinet"]
    strong = edge > 128
    assert (strokes[strong] == 255).mean() > 0.9  # measured 0.97
    assert (strokes[edge < 32] == 255).mean() < 0.1  # measured 0.03: not a filled image
    assert 0.15 < (strokes == 255).mean() < 0.5  # measured 0.31


def _nms_by_hand(x: np.ndarray, threshold: float, sigma: float) -> np.ndarray:
    """ControlNet's nms written out with array shifts: blur, keep a pixel that is >= both
    neighbours along at least one of the 4 directions (outside the image counts as -inf),
    then 255 where the kept value is above ``threshold``."""
    b = cv2.GaussianBlur(x.astype(np.float32), (0, 0), sigma)
    p = np.pad(b, 1, constant_values=-np.inf)
    h, w = b.shape

    def at(dy: int, dx: int) -> np.ndarray:
        return p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    keep = np.zeros((h, w), bool)
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        keep |= (b >= at(dy, dx)) & (b >= at(-dy, -dx))
    return np.where(keep & (b > threshold), 255, 0).astype(np.uint8)


def test_nms_matches_controlnet_definition() -> None:
    """nms equals the written-out definition on a smooth random map, and it thins ridges."""
    rng = np.random.default_rng(0)
    noise = cv2.GaussianBlur(rng.uniform(0, 255, (120, 90)).astype(np.float32), (0, 0), 4)
    soft_map = cv2.normalize(noise, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    ours = scribble_mod.nms(soft_map, 127, 3.0)
    assert np.array_equal(ours, _nms_by_hand(soft_map, 127, 3.0))
    assert 0 < (ours == 255).mean() < (soft_map > 127).mean()  # thinner than a plain threshold
    assert not scribble_mod.nms(soft_map // 3, 127, 3.0).any()  # all under the threshold


def test_scribble_stroke_step_matches_controlnet(monkeypatch: pytest.MonkeyPatch) -> None:
    """After nms(127, 3.0), strokes are blur σ=3 then ``> 4`` → 255: a 1-px line → 11 px.

    OpenCV's 8-bit blur of a 255 line gives 9, 4, 3 at 5, 6, 7 px (σ=3), so ``> 4`` keeps a
    half-width of 5 px, as in ControlNet (which also blurs the uint8 map); another sigma or
    cut (e.g. ``> 127``) gives another width. nms is replaced by a recorder returning a
    1-px line, to look at the stroke step alone.
    """
    calls: list[tuple[float, float]] = []

    def fake_nms(edge: np.ndarray, threshold: float, sigma: float) -> np.ndarray:
        calls.append((threshold, sigma))
        line = np.zeros_like(edge)
        line[:, 50] = 255
        return line

    monkeypatch.setattr(scribble_mod, "nms", fake_nms)
    stroke = scribble_mod.strokes_from_soft_edges(np.zeros((60, 100), np.uint8))
    assert calls == [(127, 3.0)]
    assert set(np.unique(stroke).tolist()) == {0, 255}
    cols = np.flatnonzero(stroke[30])
    assert cols.tolist() == list(range(45, 56))


def test_scribble_xdog_variant(room, store, scribble_room) -> None:
    """xdog runs without a model, is binary, and a lower threshold keeps more strokes."""
    empty = ModelStore(Path("/nonexistent-models"), allow_download=False)
    x32, meta = _run("scribble", room, {"variant": "xdog"}, empty)
    assert meta["method"] == "xdog"
    assert set(np.unique(x32).tolist()) == {0, 255}
    x8, _ = _run("scribble", room, {"variant": "xdog", "xdogThreshold": 8}, empty)
    x64, _ = _run("scribble", room, {"variant": "xdog", "xdogThreshold": 64}, empty)
    assert (x8 == 255).sum() > (x32 == 255).sum() > (x64 == 255).sum() > 0
    assert not np.array_equal(x32, scribble_room[0])


@pytest.mark.parametrize(
    ("name", "settings", "parameter"),
    [
        ("scribble", {"variant": "pidinet", "xdogThreshold": 10}, "xdogThreshold"),
        ("scribble", {"xdogThreshold": 10}, "xdogThreshold"),
        ("scribble", {"variant": "hed", "xdogThreshold": 10}, "xdogThreshold"),
        ("scribble", {"variant": "xdog", "pidinetModel": "tiny"}, "pidinetModel"),
        ("scribble", {"variant": "hed", "pidinetModel": "small"}, "pidinetModel"),
        ("softedge", {"variant": "hed_safe", "pidinetModel": "tiny"}, "pidinetModel"),
        ("softedge", {"pidinetModel": "large"}, "pidinetModel"),
        ("scribble", {"variant": "xdog", "xdogThreshold": 0}, "xdogThreshold"),
        ("scribble", {"variant": "xdog", "xdogThreshold": 65}, "xdogThreshold"),
    ],
)
def test_settings_for_another_variant_are_rejected(name, settings, parameter) -> None:
    with pytest.raises(InvalidParameter) as info:
        registry.get(name).validate(settings)
    assert info.value.parameter == parameter
    assert parameter in info.value.message


def test_variants_defaults_and_models() -> None:
    softedge = registry.get("softedge")
    scribble = registry.get("scribble")
    assert softedge.variants == ("pidinet", "pidinet_safe", "hed", "hed_safe")
    assert scribble.variants == ("pidinet", "hed", "xdog")
    assert softedge.price_class == scribble.price_class == "depth"
    assert [m.name for m in softedge.models("pidinet")] == ["pidinet_small", "pidinet_tiny"]
    assert [m.name for m in scribble.models("hed")] == ["controlnet_hed"]
    assert scribble.models("xdog") == ()
    assert scribble.validate({"variant": "xdog", "xdogThreshold": "16"})["xdogThreshold"] == 16
    assert softedge.validate({"pidinetModel": "tiny"})["pidinetModel"] == "tiny"
