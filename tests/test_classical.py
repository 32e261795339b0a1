"""The weight-free preprocessors: canny, shuffle, tile, and the lineart/scribble helpers.

References are recomputed here, independently and in the plain style of
ControlNet 1.1 / controlnet_aux, from photos decoded with OpenCV, so a wrong
decode, colour order, threshold, cast or formula in the engine shows up as a
pixel difference.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

from engine import registry
from engine.api import Engine
from engine.preprocessors import _classical
from engine.preprocessors.shuffle import noise_disk
from engine.registry import ProcessContext, derive_seed
from guideflow.errors import InvalidParameter
from tests.conftest import photo_paths

PHOTOS = photo_paths()


# --- reference helpers (ControlNet 1.1 style) --------------------------------------------------


def hwc3(x: np.ndarray) -> np.ndarray:
    """ControlNet's HWC3: gray → 3 channels; RGBA composited over white, truncated to uint8."""
    if x.ndim == 2:
        x = x[:, :, None]
    if x.shape[2] == 1:
        return np.concatenate([x, x, x], axis=2)
    if x.shape[2] == 4:
        color = x[:, :, 0:3].astype(np.float32)
        alpha = x[:, :, 3:4].astype(np.float32) / 255.0
        return (color * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    return x


def decode_rgb(data: bytes) -> np.ndarray:
    """PNG bytes → RGB(A) as ControlNet receives it, then HWC3."""
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    code = cv2.COLOR_BGRA2RGBA if arr.ndim == 3 and arr.shape[2] == 4 else cv2.COLOR_BGR2RGB
    return hwc3(cv2.cvtColor(arr, code) if arr.ndim == 3 else arr)


def load(path: Path) -> np.ndarray:
    return decode_rgb(path.read_bytes())


def run(name: str, image: np.ndarray, settings: dict | None = None, seed: int = 0) -> np.ndarray:
    """The registry path: validate settings, then process at the image's own size."""
    proc = registry.get(name)
    return proc.process(image, proc.validate(settings or {}), ProcessContext(seed=seed))


def reference_canny(rgb: np.ndarray, low: int, high: int) -> np.ndarray:
    return hwc3(cv2.Canny(rgb, low, high))


def reference_lineart_standard(img: np.ndarray, sigma: float = 6.0, thr: float = 8) -> np.ndarray:
    x = img.astype(np.float32)
    g = cv2.GaussianBlur(x, (0, 0), sigma)
    intensity = np.min(g - x, axis=2).clip(0, 255)
    intensity /= max(16, np.median(intensity[intensity > thr]))
    intensity *= 127
    return intensity.clip(0, 255).astype(np.uint8)


def reference_scribble_xdog(img: np.ndarray, thr: int = 32) -> np.ndarray:
    g1 = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 0.5)
    g2 = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    result = np.zeros(img.shape[:2], dtype=np.uint8)
    result[2 * (255 - dog) > thr] = 255
    return result


def black_square(size: int = 128, lo: int = 32, hi: int = 96) -> np.ndarray:
    img = np.full((size, size, 3), 255, np.uint8)
    img[lo:hi, lo:hi] = 0
    return img


@pytest.fixture(scope="module")
def room() -> np.ndarray:
    return load(next(p for p in PHOTOS if p.name == "room.png"))


@pytest.fixture(scope="module")
def man() -> np.ndarray:
    return load(next(p for p in PHOTOS if p.name == "man.png"))


def test_photos_present() -> None:
    assert len(PHOTOS) >= 2, "the parametrised photo tests below need ../shared/testdata/images"


# --- canny -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PHOTOS, ids=lambda p: p.name)
def test_canny_registry_matches_controlnet(path: Path) -> None:
    rgb = load(path)
    out = run("canny", rgb)
    assert out.shape == (*rgb.shape[:2], 3) and out.dtype == np.uint8
    assert np.array_equal(out, reference_canny(rgb, 100, 200))
    assert 0 < (out[:, :, 0] == 255).mean() < 0.5  # real edges, not an empty or full map


@pytest.mark.parametrize("path", PHOTOS, ids=lambda p: p.name)
def test_canny_engine_matches_controlnet(path: Path) -> None:
    """Bytes → Engine (decode, canny, PNG encode) → decode: identical to ControlNet's pipeline."""
    data = path.read_bytes()
    guide = Engine().preprocess(data, "canny", output_format="PNG")
    assert np.array_equal(decode_rgb(guide.data), reference_canny(decode_rgb(data), 100, 200))


def test_canny_thresholds_reach_opencv(room: np.ndarray) -> None:
    out = run("canny", room, {"lowThresholdCanny": 30, "highThresholdCanny": 90})
    assert np.array_equal(out, reference_canny(room, 30, 90))
    # Lowering only the low threshold can only add edges (hysteresis), and here it does.
    loose = run("canny", room, {"low": 20, "high": 200})[:, :, 0] > 0
    strict = run("canny", room)[:, :, 0] > 0
    assert not (strict & ~loose).any() and loose.sum() > strict.sum()


def test_canny_aliases_and_defaults() -> None:
    proc = registry.get("canny")
    values = proc.validate({"low": "10", "highThreshold": 20.0})
    assert (values["lowThresholdCanny"], values["highThresholdCanny"]) == (10, 20)
    default = proc.validate(None)
    assert (default["lowThresholdCanny"], default["highThresholdCanny"]) == (100, 200)


@pytest.mark.parametrize(
    ("settings", "parameter"),
    [
        ({"lowThresholdCanny": 200, "highThresholdCanny": 100}, "lowThresholdCanny"),
        ({"lowThresholdCanny": 150, "highThresholdCanny": 150}, "lowThresholdCanny"),
        ({"lowThresholdCanny": 250}, "lowThresholdCanny"),  # above the default high of 200
        ({"lowThresholdCanny": -1}, "lowThresholdCanny"),
        ({"highThresholdCanny": 256}, "highThresholdCanny"),
        ({"highThresholdCanny": "lots"}, "highThresholdCanny"),
        ({"lowThresholdCanny": 1.5}, "lowThresholdCanny"),
        ({"lowThresholdCanny": True}, "lowThresholdCanny"),
        ({"threshold": 100}, "threshold"),
        ({"low": 10, "lowThresholdCanny": 20}, "lowThresholdCanny"),
    ],
)
def test_canny_rejects_bad_settings(settings: dict, parameter: str) -> None:
    with pytest.raises(InvalidParameter) as err:
        registry.get("canny").validate(settings)
    assert err.value.code == "invalidParameter"
    assert err.value.parameter == parameter


# --- shuffle -----------------------------------------------------------------------------------


def coordinate_image(height: int, width: int) -> np.ndarray:
    """R = x, G = y, B = 255: bilinear sampling of it returns the sampling coordinates."""
    img = np.empty((height, width, 3), np.uint8)
    img[:, :, 0] = np.arange(width, dtype=np.uint8)[None, :]
    img[:, :, 1] = np.arange(height, dtype=np.uint8)[:, None]
    img[:, :, 2] = 255
    return img


def test_shuffle_samples_a_smooth_field_spanning_the_image() -> None:
    """The output reveals the flow: x and y maps each span exactly [0, W-1], smoothly."""
    out = run("shuffle", coordinate_image(256, 256), {"seed": 7}).astype(np.int32)
    fx, fy = out[:, :, 0], out[:, :, 1]
    # Min-max normalised to [0, W-1]: both extremes are reached, nothing leaves the image
    # (a sample past the edge would blend in the black border and lower B).
    assert fx.min() == 0 and fx.max() == 255 and fy.min() == 0 and fy.max() == 255
    assert (out[:, :, 2] == 255).all()
    # One noise cell per 256 px: neighbouring pixels sample nearby points.
    assert np.abs(np.diff(fx, axis=1)).max() <= 4 and np.abs(np.diff(fy, axis=0)).max() <= 4
    # x and y come from two different noise disks.
    assert abs(np.corrcoef(fx.ravel(), fy.ravel())[0, 1]) < 0.9


def test_shuffle_noise_scale_sets_feature_size() -> None:
    img = coordinate_image(256, 256)
    smooth = run("shuffle", img, {"seed": 3, "noiseScale": 256})[:, :, 0].astype(np.int32)
    rough = run("shuffle", img, {"seed": 3, "noiseScale": 16})[:, :, 0].astype(np.int32)
    assert np.abs(np.diff(rough, axis=1)).mean() > 2.5 * np.abs(np.diff(smooth, axis=1)).mean()


def test_noise_disk_matches_controlnet_construction() -> None:
    """Grid of H//F+2 × W//F+2 uniforms, cubic resize to (H+2F, W+2F), centre crop, min-max."""
    h, w, f = 70, 90, 32
    grid = np.random.default_rng(5).random((h // f + 2, w // f + 2))
    big = cv2.resize(grid, (w + 2 * f, h + 2 * f), interpolation=cv2.INTER_CUBIC)
    crop = big[f : f + h, f : f + w]
    expected = (crop - crop.min()) / (crop.max() - crop.min()) * (w - 1)
    got = noise_disk(np.random.default_rng(5), h, w, f, w - 1)
    assert got.dtype == np.float32 and got.shape == (h, w)
    np.testing.assert_allclose(got, expected, atol=1e-3)


def test_shuffle_seed_reproducible_and_distinct(man: np.ndarray) -> None:
    a = run("shuffle", man, {"seed": 123})
    b = run("shuffle", man, {"seed": 123}, seed=999)  # explicit seed wins over ctx.seed
    c = run("shuffle", man, {"seed": 124})
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 10


def test_shuffle_default_seed_comes_from_task(man: np.ndarray) -> None:
    one = run("shuffle", man, seed=derive_seed("task-a"))
    again = run("shuffle", man, seed=derive_seed("task-a"))
    other = run("shuffle", man, seed=derive_seed("task-b"))
    assert np.array_equal(one, again) and not np.array_equal(one, other)


def test_shuffle_engine_task_uuid_reproduces(photo_bytes) -> None:
    data = photo_bytes("man.png")
    engine = Engine()
    a = engine.preprocess(data, "shuffle", output_format="PNG", task_uuid="uuid-1")
    b = engine.preprocess(data, "shuffle", output_format="PNG", task_uuid="uuid-1")
    c = engine.preprocess(data, "shuffle", output_format="PNG", task_uuid="uuid-2")
    assert a.data == b.data and not np.array_equal(a.array, c.array)


def test_shuffle_keeps_colours_scrambles_layout(room: np.ndarray) -> None:
    out = run("shuffle", room, {"seed": 1})
    assert out.shape == room.shape and out.dtype == np.uint8
    # Same palette overall (the flow covers the whole image), very different layout.
    assert np.abs(out.reshape(-1, 3).mean(0) - room.reshape(-1, 3).mean(0)).max() < 25
    assert np.abs(out.astype(int) - room.astype(int)).mean() > 20


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (5, 3), (301, 199)])
def test_shuffle_odd_shapes(shape: tuple[int, int]) -> None:
    img = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    assert run("shuffle", img, {"seed": 2}).shape == (*shape, 3)


@pytest.mark.parametrize(
    ("settings", "parameter"),
    [
        ({"noiseScale": 8}, "noiseScale"),
        ({"noiseScale": 2048}, "noiseScale"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**32}, "seed"),
        ({"seed": "abc"}, "seed"),
        ({"f": 64}, "f"),
    ],
)
def test_shuffle_rejects_bad_settings(settings: dict, parameter: str) -> None:
    with pytest.raises(InvalidParameter) as err:
        registry.get("shuffle").validate(settings)
    assert err.value.parameter == parameter


# --- tile --------------------------------------------------------------------------------------


def laplacian_var(img: np.ndarray) -> float:
    return float(cv2.Laplacian(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var())


def plain_pyramid(img: np.ndarray, levels: int) -> np.ndarray:
    y = img.astype(np.float32)
    sizes = []
    for _ in range(levels):
        sizes.append((y.shape[1], y.shape[0]))
        y = cv2.pyrDown(y)
    for size in reversed(sizes):
        y = cv2.pyrUp(y, dstsize=size)
    return y.clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("levels", [1, 3])
def test_tile_without_noise_is_a_plain_pyramid_blur(room: np.ndarray, levels: int) -> None:
    settings = {"noiseSigma": 0, "pyramidLevels": levels}
    out = run("tile", room, settings, seed=1)
    assert np.array_equal(out, run("tile", room, settings, seed=2))  # no randomness left
    assert np.array_equal(out, plain_pyramid(room, levels))
    assert laplacian_var(out) < laplacian_var(room) / 4


def test_tile_default_is_blurred_and_noised(room: np.ndarray) -> None:
    out = run("tile", room, seed=5)
    # Coarse content kept: heavily smoothed output and input agree.
    smooth = lambda a: cv2.GaussianBlur(a.astype(np.float32), (0, 0), 8.0)  # noqa: E731
    assert np.abs(smooth(out) - smooth(room)).mean() < 6
    # Fine detail replaced: the high-pass part of the output no longer follows the input's.
    high = lambda a: a.astype(np.float32) - cv2.GaussianBlur(a.astype(np.float32), (0, 0), 1.5)  # noqa: E731
    assert abs(np.corrcoef(high(out).ravel(), high(room).ravel())[0, 1]) < 0.3


def test_tile_noise_sigma_scales_the_noise() -> None:
    """On flat grey, the output's spread is the noise alone and grows linearly with sigma."""
    grey = np.full((256, 256, 3), 128, np.uint8)
    std16 = run("tile", grey, {"noiseSigma": 16}, seed=3).astype(np.float64).std()
    std8 = run("tile", grey, {"noiseSigma": 8}, seed=3).astype(np.float64).std()
    # The last level adds N(0, sigma) at full size; lower levels add smoothed noise on top.
    assert 16 <= std16 <= 24
    assert 0.45 <= std8 / std16 <= 0.55


def test_tile_seed_reproducible_and_distinct(man: np.ndarray) -> None:
    a = run("tile", man, {"seed": 11})
    assert np.array_equal(a, run("tile", man, {"seed": 11}, seed=77))
    assert not np.array_equal(a, run("tile", man, {"seed": 12}))
    task = derive_seed("task-t")
    assert np.array_equal(run("tile", man, seed=task), run("tile", man, seed=task))
    assert not np.array_equal(run("tile", man, seed=1), run("tile", man, seed=2))


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (17, 9), (301, 199)])
@pytest.mark.parametrize("levels", [1, 4])
def test_tile_odd_shapes(shape: tuple[int, int], levels: int) -> None:
    img = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    assert run("tile", img, {"pyramidLevels": levels}).shape == (*shape, 3)


@pytest.mark.parametrize(
    ("settings", "parameter"),
    [
        ({"pyramidLevels": 0}, "pyramidLevels"),
        ({"pyramidLevels": 5}, "pyramidLevels"),
        ({"noiseSigma": -0.5}, "noiseSigma"),
        ({"noiseSigma": 51}, "noiseSigma"),
        ({"noiseSigma": "nan"}, "noiseSigma"),
        ({"seed": 2**32}, "seed"),
    ],
)
def test_tile_rejects_bad_settings(settings: dict, parameter: str) -> None:
    with pytest.raises(InvalidParameter) as err:
        registry.get("tile").validate(settings)
    assert err.value.parameter == parameter


# --- lineart_standard and scribble_xdog ----------------------------------------------------------


@pytest.mark.parametrize("name", ["room", "man"])
def test_lineart_standard_matches_reference(name: str, request: pytest.FixtureRequest) -> None:
    img = request.getfixturevalue(name)
    out = _classical.lineart_standard(img)
    assert out.shape == img.shape[:2] and out.dtype == np.uint8
    assert np.array_equal(out, reference_lineart_standard(img))
    assert np.array_equal(
        _classical.lineart_standard(img, gaussian_sigma=2.0, intensity_threshold=20),
        reference_lineart_standard(img, 2.0, 20),
    )
    assert 0.01 < (out > 0).mean() < 0.9


@pytest.mark.parametrize("name", ["room", "man"])
def test_scribble_xdog_matches_reference(name: str, request: pytest.FixtureRequest) -> None:
    img = request.getfixturevalue(name)
    out = _classical.scribble_xdog(img)
    assert out.shape == img.shape[:2] and out.dtype == np.uint8
    assert set(np.unique(out)) <= {0, 255}
    assert np.array_equal(out, reference_scribble_xdog(img))
    loose = _classical.scribble_xdog(img, threshold=8)
    assert np.array_equal(loose, reference_scribble_xdog(img, 8))
    assert (loose >= out).all() and (loose > out).any()  # lower threshold keeps more


def test_lineart_standard_on_black_square() -> None:
    img = black_square()
    out = _classical.lineart_standard(img)
    assert np.array_equal(out, reference_lineart_standard(img))
    inside = np.zeros(out.shape, bool)
    inside[32:96, 32:96] = True
    assert (out[~inside] == 0).all()  # white is never darker than its surroundings
    assert (out[32, 32:96] > 0).all() and (out[32:96, 95] > 0).all()  # the square's rim
    assert (out[56:72, 56:72] == 0).all()  # flat middle, far from the edge


def test_scribble_xdog_on_black_square_keeps_reference_wrap() -> None:
    img = black_square()
    out = _classical.scribble_xdog(img)
    assert np.array_equal(out, reference_scribble_xdog(img))
    inside = np.zeros(out.shape, bool)
    inside[32:96, 32:96] = True
    assert (out[~inside] == 0).all()
    # The square's rim is traced, away from the corners (see the wrap below).
    assert (out[32, 36:92] == 255).all() and (out[36:92, 95] == 255).all()
    assert (out[48:80, 48:80] == 0).all()
    # The reference doubles ``255 - dog`` in uint8, so a pixel 128+ levels darker than its
    # surroundings wraps around: the square's corner pixel is such a hole. We keep it.
    g1 = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 0.5)
    g2 = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 5.0)
    m = np.clip(np.min(g2 - g1, axis=2), 0, 255).astype(np.int64)
    assert m[32, 32] >= 128 and 2 * m[32, 32] > 32  # a stroke without the wrap...
    assert out[32, 32] == 0  # ...but not in ControlNet's output, nor ours


@pytest.mark.parametrize("value", [0, 255])
def test_flat_images_give_no_lines_and_no_warnings(value: int) -> None:
    flat = np.full((40, 60, 3), value, np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not _classical.lineart_standard(flat).any()
        assert not _classical.scribble_xdog(flat).any()
