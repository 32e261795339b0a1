"""depth and normalbae.

No real depth or normal weights exist here, so every model-backed test installs a **tiny
ONNX stand-in graph** with the real model's I/O signature (names, dtype, rank) into a
temporary models dir and patches the module's spec constant to it; the real model store
(sha256 check), onnxruntime session and pre/post-processing all run. Each graph is
described in its builder's docstring. The normals-from-depth geometry needs no model and
is tested on synthetic depth ramps.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import helper

from engine import registry
from engine.models.store import ModelSpec, ModelStore
from engine.preprocessors import depth as depth_mod
from engine.preprocessors import normalbae as normal_mod
from engine.registry import ProcessContext
from guideflow.errors import ModelCorrupt, ModelUnavailable
from tests.onnx_graphs import const, install, make_model, value_info
from tests.onnx_spy import spy_feeds

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


# -- tiny stand-in graphs -----------------------------------------------------------------------


def depth_graph(kind: str, input_shape: list[Any] | None = None) -> bytes:
    """Depth Anything V2 / DPT I/O: ``pixel_values`` f32 [1,3,H,W] → ``predicted_depth`` [1,H,W].

    ``kind`` picks what the stand-in computes from its input ``x``:

    * ``"mean"``: the mean over channels (brighter = "nearer" for grey images);
    * ``"abs_red"``: ``|x[:, 0]|``, the absolute normalised red value, whose minimum sits
      where the red value equals the normalisation mean, so the output reveals it;
    * ``"constant"``: 3.0 everywhere (a depth map with no range).
    """
    shape = input_shape or [1, 3, "h", "w"]
    out_shape = [1, shape[2], shape[3]]
    inits = []
    if kind == "mean":
        nodes = [
            helper.make_node(
                "ReduceMean", ["pixel_values"], ["predicted_depth"], axes=[1], keepdims=0
            )
        ]
    elif kind == "abs_red":
        inits = [
            const("s0", np.array([0], np.int64)),
            const("s1", np.array([1], np.int64)),
            const("ax", np.array([1], np.int64)),
        ]
        nodes = [
            helper.make_node("Slice", ["pixel_values", "s0", "s1", "ax"], ["red"]),
            helper.make_node("Abs", ["red"], ["abs_red"]),
            helper.make_node("ReduceMean", ["abs_red"], ["predicted_depth"], axes=[1], keepdims=0),
        ]
    else:
        inits = [const("zero", np.float32(0.0)), const("three", np.float32(3.0))]
        nodes = [
            helper.make_node("ReduceMean", ["pixel_values"], ["m"], axes=[1], keepdims=0),
            helper.make_node("Mul", ["m", "zero"], ["z"]),
            helper.make_node("Add", ["z", "three"], ["predicted_depth"]),
        ]
    return make_model(
        nodes,
        [value_info("pixel_values", np.float32, shape)],
        [value_info("predicted_depth", np.float32, out_shape)],
        inits,
    )


def normalbae_graph(normal: tuple[float, float, float, float]) -> bytes:
    """NormalBAE I/O: ``input`` f32 [1,3,H,W] → ``output`` [1,4,H,W] (x, y, z, kappa).

    The stand-in ignores the pixel values and returns the constant vector ``normal`` at
    every pixel, at the input's spatial size.
    """
    inits = [
        const("zero", np.float32(0.0)),
        const("vec", np.asarray(normal, np.float32).reshape(1, 4, 1, 1)),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["m"], axes=[1], keepdims=1),
        helper.make_node("Mul", ["m", "zero"], ["z"]),
        helper.make_node("Add", ["z", "vec"], ["output"]),
    ]
    return make_model(
        nodes,
        [value_info("input", np.float32, [1, 3, "h", "w"])],
        [value_info("output", np.float32, [1, 4, "h", "w"])],
        inits,
    )


# -- helpers ----------------------------------------------------------------------------------


def _ramp(h: int, w: int, axis: int = 1) -> np.ndarray:
    """Grey RGB image, 0 → 255 along ``axis`` (1: left → right, 0: top → bottom)."""
    n = w if axis == 1 else h
    line = np.round(np.linspace(0, 255, n)).astype(np.uint8)
    grey = np.tile(line, (h, 1)) if axis == 1 else np.tile(line[:, None], (1, w))
    return np.repeat(grey[:, :, None], 3, axis=2)


def _run(name: str, image: np.ndarray, settings: dict[str, Any], store: ModelStore):
    proc = registry.get(name)
    ctx = ProcessContext(seed=0, models=store)
    out = proc.process(image, proc.validate(settings), ctx)
    assert out.dtype == np.uint8 and out.shape == (*image.shape[:2], 3)
    return out, ctx.meta


@pytest.fixture()
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path, allow_download=False)


def _install_depth(monkeypatch, store: ModelStore, kind: str, **kw: Any) -> ModelSpec:
    spec = install(store.models_dir, depth_mod.DEPTH_ANYTHING_V2, depth_graph(kind, **kw))
    monkeypatch.setattr(depth_mod, "DEPTH_ANYTHING_V2", spec)
    return spec


# -- depth ------------------------------------------------------------------------------------


def test_depth_near_is_white_minmax_at_output_size(monkeypatch, store) -> None:
    """Stand-in: depth = channel mean, so brighter = nearer. A left→right grey ramp gives a
    non-square map at the output size, exactly 0..255, black on the left (far) and white on
    the right (near), increasing along every row, with 3 equal channels."""
    _install_depth(monkeypatch, store, "mean")
    image = _ramp(90, 140)
    out, meta = _run("depth", image, {}, store)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all()
    gray = out[..., 0].astype(int)
    assert gray.min() == 0 and gray.max() == 255
    # The channel mean of a normalised grey is affine in the grey, so after min-max the
    # map reproduces the ramp itself: 0 (far) on the left, 255 (near) on the right.
    assert np.abs(gray - image[..., 0].astype(int)).max() <= 2
    assert (np.diff(gray.mean(axis=0)) >= -0.5).all()  # monotone left → right
    assert meta["depthModel"] == "depth_anything_v2_small"


def test_depth_anything_input_is_multiple_of_14_and_imagenet_normalised(monkeypatch, store) -> None:
    """Spy on the stand-in's input: shorter side 518, both sides multiples of 14, aspect
    kept, and a flat (200, 100, 50) image arrives as ImageNet-normalised RGB/255."""
    _install_depth(monkeypatch, store, "mean")
    feeds = spy_feeds(monkeypatch)
    image = np.empty((300, 451, 3), np.uint8)
    image[:] = (200, 100, 50)
    _run("depth", image, {}, store)
    (fed,) = feeds()
    x = fed["pixel_values"]
    assert x.dtype == np.float32 and x.shape[:2] == (1, 3)
    h, w = x.shape[2:]
    assert h % 14 == 0 and w % 14 == 0 and min(h, w) == 518
    assert abs(w / h - 451 / 300) < 0.03
    expected = (np.array([200, 100, 50], np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(x[0].reshape(3, -1).mean(axis=1), expected, atol=1e-4)
    np.testing.assert_allclose(x[0].reshape(3, -1).std(axis=1), 0, atol=1e-4)


def test_depth_anything_normalisation_shows_in_the_output(monkeypatch, store) -> None:
    """Stand-in: depth = |normalised red|. On a 0..255 grey ramp its minimum (black) sits
    where red/255 equals the ImageNet red mean 0.485 (grey ≈ 124), and the left end is
    0.485/0.515 of the right end (≈ 240 after min-max). Unnormalised input would put the
    minimum at 0; mean/std 0.5 would put it at 128 with both ends 255."""
    _install_depth(monkeypatch, store, "abs_red")
    out, _ = _run("depth", _ramp(64, 256), {}, store)
    profile = out[..., 0].astype(float).mean(axis=0)
    assert abs(int(np.argmin(profile)) - 124) <= 2
    assert profile[-1] == pytest.approx(255, abs=1)
    assert 236 <= profile[0] <= 244


def test_depth_constant_map_is_black_without_warnings(monkeypatch, store) -> None:
    """Stand-in: constant depth 3.0. No range → all black, no division-by-zero warning."""
    _install_depth(monkeypatch, store, "constant")
    image = _ramp(40, 70)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, _ = _run("depth", image, {}, store)
    assert (out == 0).all()


@pytest.mark.parametrize("shape", [None, [1, 3, 256, 256]])
def test_midas_feeds_dpt_size_and_half_normalisation(monkeypatch, store, shape) -> None:
    """MiDaS DPT-Hybrid stand-in (channel mean), dynamic or fixed 256×256 input: fed at
    384×384 (the export's size) or at the graph's fixed size, as ``x/127.5 - 1``; the
    output is still the full non-square output size."""
    spec = install(store.models_dir, depth_mod.MIDAS_DPT_HYBRID, depth_graph("mean", shape))
    monkeypatch.setattr(depth_mod, "MIDAS_DPT_HYBRID", spec)
    feeds = spy_feeds(monkeypatch)
    image = np.empty((120, 200, 3), np.uint8)
    image[:] = (51, 102, 204)
    image[:, 100:] = 255
    out, meta = _run("depth", image, {"variant": "midas"}, store)
    x = feeds()[0]["pixel_values"]
    assert x.shape == (1, 3, 256, 256) if shape else x.shape == (1, 3, 384, 384)
    np.testing.assert_allclose(x[0, :, 5, 5], np.array([51, 102, 204]) / 127.5 - 1, atol=1e-5)
    assert meta["depthModel"] == "midas_dpt_hybrid"
    # The white half is "nearer" (bicubic ringing at the step shifts the extremes a little).
    assert out[60, 10, 0] < 20 and out[60, 190, 0] > 235


def test_depth_weights_absent_offline_is_model_unavailable(store) -> None:
    """Real spec, empty models dir, downloads off: modelUnavailable naming the file and fix."""
    with pytest.raises(ModelUnavailable) as err:
        _run("depth", _ramp(32, 32), {}, store)
    assert err.value.code == "modelUnavailable"
    assert "depth_anything_v2_small.onnx" in err.value.message
    assert "Fix:" in err.value.message


def test_depth_wrong_checksum_is_model_corrupt(store) -> None:
    """A file where the real (pinned) spec expects its weights, with other bytes: modelCorrupt."""
    path = store.models_dir / depth_mod.DEPTH_ANYTHING_V2.local_relpath()
    path.parent.mkdir(parents=True)
    path.write_bytes(depth_graph("mean"))
    with pytest.raises(ModelCorrupt) as err:
        _run("depth", _ramp(32, 32), {}, store)
    assert err.value.code == "modelCorrupt"


# -- normals from depth: geometry -------------------------------------------------------------


def _depth_ramp(h: int, w: int, axis: int, reverse: bool = False) -> np.ndarray:
    """Relative inverse depth (larger = nearer) rising 0 → 1 along ``axis``."""
    n = w if axis == 1 else h
    line = np.linspace(0.0, 1.0, n, dtype=np.float32)
    if reverse:
        line = line[::-1]
    return np.tile(line, (h, 1)) if axis == 1 else np.tile(line[:, None], (1, w))


def test_normals_nearer_to_the_right_turn_red_up() -> None:
    """Nearer towards the right = the surface turns left: R > 128, G = 128, B < 255; the
    far part (normalised depth < 0.4) is background, facing the camera (128, 128, 255)."""
    rgb = normal_mod.normals_to_rgb(normal_mod.normals_from_depth(_depth_ramp(60, 100, axis=1)))
    inner = rgb[5:-5, 60:-5]
    assert (inner[..., 0] > 200).all() and (inner[..., 1] == 128).all()
    assert (inner[..., 2] < 235).all()
    assert (rgb[:, 5:35] == (128, 128, 255)).all()
    mirrored = normal_mod.normals_to_rgb(
        normal_mod.normals_from_depth(_depth_ramp(60, 100, axis=1, reverse=True))
    )
    assert (mirrored[5:-5, 5:40, 0] < 56).all()  # nearer towards the left: R < 128


def test_normals_nearer_towards_the_bottom_turn_green_up() -> None:
    """Nearer towards the bottom (like a floor) = the surface turns up: G > 128, R = 128."""
    rgb = normal_mod.normals_to_rgb(normal_mod.normals_from_depth(_depth_ramp(100, 60, axis=0)))
    inner = rgb[60:-5, 5:-5]
    assert (inner[..., 1] > 200).all() and (inner[..., 0] == 128).all()


def test_flat_depth_faces_the_camera() -> None:
    """A depth map without relief gives (128, 128, 255) everywhere."""
    rgb = normal_mod.normals_to_rgb(
        normal_mod.normals_from_depth(np.full((30, 40), 7.0, np.float32))
    )
    assert (rgb == (128, 128, 255)).all()


def test_normal_tilt_does_not_depend_on_image_size() -> None:
    """The same scene at two sizes gives the same colours (depth is scaled to the image)."""
    small = normal_mod.normals_to_rgb(normal_mod.normals_from_depth(_depth_ramp(60, 80, axis=1)))
    big = normal_mod.normals_to_rgb(normal_mod.normals_from_depth(_depth_ramp(120, 160, axis=1)))
    assert np.abs(small[30, 70].astype(int) - big[60, 140].astype(int)).max() <= 2


# -- normalbae preprocessor -------------------------------------------------------------------


def _install_normalbae(monkeypatch, store, normal=(1.5, -0.25, 0.75, 7.0)) -> ModelSpec:
    spec = install(store.models_dir, normal_mod.NORMALBAE, normalbae_graph(normal))
    monkeypatch.setattr(normal_mod, "NORMALBAE", spec)
    return spec


def test_normalbae_conversion_is_controlnets(monkeypatch, store) -> None:
    """Stand-in returns the normal (1.5, -0.25, 0.75) with kappa 7 everywhere. ControlNet's
    ``((n + 1) / 2).clip(0, 1) * 255`` on the first 3 channels gives (255, 96, 223) exactly
    (x clipped, kappa dropped, no renormalisation); the input was ImageNet-normalised RGB at
    a detect size with shorter side 512 and sides multiples of 64."""
    _install_normalbae(monkeypatch, store)
    feeds = spy_feeds(monkeypatch)
    image = np.empty((150, 230, 3), np.uint8)
    image[:] = (10, 120, 240)
    out, meta = _run("normalbae", image, {}, store)
    assert (out == (255, 96, 223)).all()
    assert meta["normal_method"] == "normalbae"
    x = feeds()[0]["input"]
    h, w = x.shape[2:]
    assert h % 64 == 0 and w % 64 == 0 and min(h, w) == 512
    expected = (np.array([10, 120, 240], np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(x[0, :, 7, 7], expected, atol=1e-4)


def test_normalbae_falls_back_to_depth_and_says_so(monkeypatch, store) -> None:
    """No NormalBAE weights, depth stand-in (channel mean) present: normals are derived from
    depth, ``normal_method`` is ``depth_sobel``. A ramp brightening to the right is nearer
    on the right, so the near part turns red-up."""
    _install_depth(monkeypatch, store, "mean")
    out, meta = _run("normalbae", _ramp(80, 120), {}, store)
    assert meta["normal_method"] == "depth_sobel"
    assert meta["depthModel"] == "depth_anything_v2_small"
    assert (out[10:-10, 80:-10, 0] > 160).all()
    assert (out[10:-10, 5:30] == (128, 128, 255)).all()


def test_normalbae_depth_variant_ignores_normal_model(monkeypatch, store) -> None:
    """variant 'depth' derives normals from depth even when NormalBAE is configured."""
    _install_normalbae(monkeypatch, store)
    _install_depth(monkeypatch, store, "mean")
    out, meta = _run("normalbae", _ramp(40, 60), {"variant": "depth"}, store)
    assert meta["normal_method"] == "depth_sobel"
    assert not (out == (255, 96, 223)).all()


def test_normalbae_without_any_weights_names_both_fixes(store) -> None:
    """Neither NormalBAE nor depth weights: the depth model's modelUnavailable, which also
    says how to configure NormalBAE."""
    with pytest.raises(ModelUnavailable) as err:
        _run("normalbae", _ramp(32, 32), {}, store)
    assert "depth_anything_v2_small.onnx" in err.value.message
    assert "normalbae_scannet.onnx" in err.value.message


def test_broken_normal_model_is_an_error_not_a_fallback(monkeypatch, store) -> None:
    """A configured NormalBAE file that onnxruntime cannot load is modelCorrupt; the depth
    fallback is only for weights that are absent."""
    _install_depth(monkeypatch, store, "mean")
    path = store.models_dir / normal_mod.NORMALBAE.local_relpath()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not an onnx model")
    with pytest.raises(ModelCorrupt):
        _run("normalbae", _ramp(32, 32), {}, store)


def test_engine_response_reports_the_normal_method(monkeypatch, store, photo_bytes) -> None:
    """Through the engine on a real photo (depth stand-in: channel mean; no NormalBAE): the
    guide image's meta says ``normal_method = depth_sobel`` and the size is the photo's."""
    from engine.api import Engine

    _install_depth(monkeypatch, store, "mean")
    guide = Engine(models=store).preprocess(
        photo_bytes("room.png"), "normalbae", output_format="PNG"
    )
    assert guide.meta["normal_method"] == "depth_sobel"
    assert guide.array.shape[2] == 3 and guide.data[:4] == b"\x89PNG"
    # z = 2π > 0 before normalising: every derived normal faces the camera (B ≥ 128).
    assert guide.array[..., 2].min() >= 128
