"""lineart (realistic / coarse / standard) and lineart_anime.

No real lineart weights exist here, so the model variants run on **tiny ONNX stand-in
graphs** with the real exports' I/O (``input`` f32 [1,3,H,W] → ``output`` [1,1,H,W]),
installed in a temporary models dir with the module's spec constant patched to them; the
model store, onnxruntime and all pre/post-processing are the real code. The ``standard``
variant is classical and runs on a real photo.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import helper

from engine import registry
from engine.imageio import decode_image
from engine.models.store import ModelStore
from engine.preprocessors import lineart as lineart_mod
from engine.preprocessors import lineart_anime as anime_mod
from engine.preprocessors._classical import lineart_standard
from engine.registry import ProcessContext
from guideflow.errors import InvalidParameter, ModelCorrupt, ModelUnavailable
from tests.onnx_graphs import const, install, make_model, value_info
from tests.onnx_spy import spy_feeds


def line_graph(constant: float | None = None) -> bytes:
    """Lineart / lineart_anime I/O: ``input`` f32 [1,3,H,W] → ``output`` [1,1,H,W].

    The stand-in "draws" the channel mean of its input (dark where the photo is dark, in
    the input's own range: [0, 1] for lineart, [-1, 1] for lineart_anime), or ``constant``
    everywhere when given.
    """
    nodes = [helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1], keepdims=1)]
    inits = []
    if constant is None:
        nodes.append(helper.make_node("Identity", ["mean"], ["output"]))
    else:
        inits = [const("zero", np.float32(0.0)), const("c", np.float32(constant))]
        nodes += [
            helper.make_node("Mul", ["mean", "zero"], ["z"]),
            helper.make_node("Add", ["z", "c"], ["output"]),
        ]
    return make_model(
        nodes,
        [value_info("input", np.float32, [1, 3, "h", "w"])],
        [value_info("output", np.float32, [1, 1, "h", "w"])],
        inits,
    )


def _bar_image(h: int = 120, w: int = 200) -> np.ndarray:
    """White image with a black vertical bar over columns 80..119."""
    image = np.full((h, w, 3), 255, np.uint8)
    image[:, 80:120] = 0
    return image


def _run(name: str, image: np.ndarray, settings: dict[str, Any], store: ModelStore):
    proc = registry.get(name)
    ctx = ProcessContext(seed=0, models=store)
    out = proc.process(image, proc.validate(settings), ctx)
    assert out.dtype == np.uint8 and out.shape == (*image.shape[:2], 3)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all()
    return out[..., 0], ctx.meta


@pytest.fixture()
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path, allow_download=False)


def _install(monkeypatch, store: ModelStore, module: Any, attr: str, data: bytes) -> None:
    spec = install(store.models_dir, getattr(module, attr), data)
    monkeypatch.setattr(module, attr, spec)


# -- lineart, model variants ------------------------------------------------------------------


def test_realistic_inverts_to_white_lines_on_black(monkeypatch, store) -> None:
    """Stand-in draws the channel mean (dark bar → 0). ControlNet inverts the drawing: the
    dark bar becomes white (255), the white ground black (0), at the output size."""
    _install(monkeypatch, store, lineart_mod, "LINEART_REALISTIC", line_graph())
    lines, meta = _run("lineart", _bar_image(), {}, store)
    assert (lines[:, 85:115] == 255).all()
    assert (lines[:, :70] == 0).all() and (lines[:, 130:] == 0).all()
    assert meta["model"] == "lineart_realistic"


def test_lineart_feeds_rgb_over_255_at_detect_size(monkeypatch, store) -> None:
    """Spy: the network gets RGB/255 (pure red → channels 1, 0, 0: no BGR swap, no mean/std)
    at shorter side 512 with both sides multiples of 64."""
    _install(monkeypatch, store, lineart_mod, "LINEART_REALISTIC", line_graph())
    feeds = spy_feeds(monkeypatch)
    image = np.zeros((150, 230, 3), np.uint8)
    image[..., 0] = 255
    lines, _ = _run("lineart", image, {}, store)
    x = feeds()[0]["input"]
    assert x.shape[:2] == (1, 3) and min(x.shape[2:]) == 512
    assert x.shape[2] % 64 == 0 and x.shape[3] % 64 == 0
    np.testing.assert_allclose(x[0, :, 10, 10], [1.0, 0.0, 0.0], atol=1e-6)
    assert (lines == round((1 - 1 / 3) * 255)).all()  # 1 - mean(1, 0, 0)


def test_coarse_variant_runs_the_coarse_weights(monkeypatch, store) -> None:
    """The coarse stand-in draws 0.25 everywhere (realistic: the channel mean), so the coarse
    output is 1 - 0.25 → 191 everywhere and the realistic one is not."""
    _install(monkeypatch, store, lineart_mod, "LINEART_REALISTIC", line_graph())
    _install(monkeypatch, store, lineart_mod, "LINEART_COARSE", line_graph(0.25))
    coarse, meta = _run("lineart", _bar_image(), {"variant": "coarse"}, store)
    assert (coarse == 191).all() and meta["model"] == "lineart_coarse"
    realistic, _ = _run("lineart", _bar_image(), {"variant": "realistic"}, store)
    assert not (realistic == 191).all()


def test_lineart_weights_absent_offline_is_model_unavailable(store) -> None:
    """Real spec, empty models dir, downloads off: modelUnavailable naming the file and fix."""
    with pytest.raises(ModelUnavailable) as err:
        _run("lineart", _bar_image(), {}, store)
    assert "lineart.onnx" in err.value.message and "Fix:" in err.value.message


def test_lineart_wrong_checksum_is_model_corrupt(store) -> None:
    """Other bytes where the pinned coarse weights belong: modelCorrupt."""
    path = store.models_dir / lineart_mod.LINEART_COARSE.local_relpath()
    path.parent.mkdir(parents=True)
    path.write_bytes(line_graph())
    with pytest.raises(ModelCorrupt):
        _run("lineart", _bar_image(), {"variant": "coarse"}, store)


# -- lineart, standard ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def room(images_dir: Path) -> np.ndarray:
    return decode_image((images_dir / "room.png").read_bytes())


def test_standard_on_a_real_photo(room) -> None:
    """Classical line art of room.png: the shared lineart_standard with the defaults (6.0, 8),
    a plausible share of line pixels, and the settings change the result."""
    store = ModelStore(allow_download=False)  # standard needs no weights
    lines, _ = _run("lineart", room, {"variant": "standard"}, store)
    np.testing.assert_array_equal(lines, lineart_standard(room, 6.0, 8))
    lit = (lines > 32).mean()
    assert 0.01 < lit < 0.5
    sharper, _ = _run("lineart", room, {"variant": "standard", "gaussianSigma": 2.0}, store)
    assert (sharper != lines).mean() > 0.05


def test_standard_settings_default_and_validate() -> None:
    """With the standard variant the settings are filled with their defaults."""
    proc = registry.get("lineart")
    values = proc.validate({"variant": "standard", "intensityThreshold": 20})
    assert values["gaussianSigma"] == 6.0 and values["intensityThreshold"] == 20


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"gaussianSigma": 3.0}, "gaussianSigma"),  # default variant (realistic)
        ({"variant": "realistic", "intensityThreshold": 4}, "intensityThreshold"),
        ({"variant": "coarse", "gaussianSigma": 3.0, "intensityThreshold": 4}, "gaussianSigma"),
    ],
)
def test_standard_settings_rejected_for_model_variants(settings, named) -> None:
    """Settings that do not apply to the chosen variant are invalidParameter, named."""
    with pytest.raises(InvalidParameter) as err:
        registry.get("lineart").validate(settings)
    assert err.value.parameter == named
    for key in settings:
        if key != "variant":
            assert key in err.value.message


# -- lineart_anime ----------------------------------------------------------------------------


def test_anime_feeds_multiples_of_256_in_minus_one_to_one(monkeypatch, store) -> None:
    """Spy: a 300×400 image reaches the U-Net at 768×512 (detect size 704×512, then up to
    multiples of 256), scaled ``x/127.5 - 1`` (grey 51 → -0.6)."""
    _install(monkeypatch, store, anime_mod, "LINEART_ANIME", line_graph())
    feeds = spy_feeds(monkeypatch)
    image = np.full((300, 400, 3), 51, np.uint8)
    _run("lineart_anime", image, {}, store)
    x = feeds()[0]["input"]
    assert x.shape == (1, 3, 512, 768)
    np.testing.assert_allclose(x[0, :, 100, 100], -0.6, atol=1e-6)


def test_anime_output_is_white_lines_on_black(monkeypatch, store) -> None:
    """Stand-in draws the channel mean in [-1, 1]: ``(out + 1)/2`` inverted puts the dark bar
    at 255 and the white ground at 0."""
    _install(monkeypatch, store, anime_mod, "LINEART_ANIME", line_graph())
    lines, meta = _run("lineart_anime", _bar_image(), {}, store)
    assert (lines[:, 85:115] == 255).all()
    assert (lines[:, :70] == 0).all() and (lines[:, 130:] == 0).all()
    assert meta["model"] == "lineart_anime"


def test_anime_mid_grey_maps_to_half(monkeypatch, store) -> None:
    """Stand-in draws 0.0 (mid-way in [-1, 1]) → line strength ½ → 128 (rounded 127.5)."""
    _install(monkeypatch, store, anime_mod, "LINEART_ANIME", line_graph(0.0))
    lines, _ = _run("lineart_anime", _bar_image(64, 64), {}, store)
    assert (lines == 128).all()


def test_anime_weights_absent_or_corrupt(store) -> None:
    """No file → modelUnavailable naming it; other bytes at its place → modelCorrupt."""
    with pytest.raises(ModelUnavailable) as err:
        _run("lineart_anime", _bar_image(), {}, store)
    assert "lineart_anime.onnx" in err.value.message
    path = store.models_dir / anime_mod.LINEART_ANIME.local_relpath()
    path.parent.mkdir(parents=True)
    path.write_bytes(line_graph())
    with pytest.raises(ModelCorrupt):
        _run("lineart_anime", _bar_image(), {}, store)
