"""engine.imageio: decoding untrusted bytes, HWC3 normalisation, limits, encoding.

Every input is generated here with Pillow/numpy (plus the real photos in ../shared),
so each test states exactly which bytes it feeds in.
"""

from __future__ import annotations

import io
import struct
import tracemalloc
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageFile

from engine import imageio
from engine.imageio import (
    DEFAULT_LIMITS,
    ImageLimits,
    content_type,
    decode_image,
    encode_image,
    file_extension,
    hwc3,
    normalize_format,
    sniff_format,
    validate_quality,
)
from guideflow.errors import (
    GuideflowError,
    ImageTooLarge,
    InvalidImage,
    InvalidParameter,
    UnsupportedImageFormat,
)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


# ----------------------------------------------------------------------------- helpers


def save(im: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def reference_hwc3(x: np.ndarray) -> np.ndarray:
    """ControlNet's HWC3, verbatim semantics (annotator/util.py), for comparison."""
    if x.ndim == 2:
        x = x[:, :, None]
    if x.shape[2] == 3:
        return x
    if x.shape[2] == 1:
        return np.concatenate([x, x, x], axis=2)
    color = x[:, :, 0:3].astype(np.float32)
    alpha = x[:, :, 3:4].astype(np.float32) / 255.0
    y = color * alpha + 255.0 * (1.0 - alpha)
    return y.clip(0, 255).astype(np.uint8)


def quadrants(w: int = 60, h: int = 40) -> np.ndarray:
    """Red | green over blue | white: four flat quadrants, easy to check after lossy codecs."""
    arr = np.empty((h, w, 3), dtype=np.uint8)
    arr[: h // 2, : w // 2] = RED
    arr[: h // 2, w // 2 :] = GREEN
    arr[h // 2 :, : w // 2] = BLUE
    arr[h // 2 :, w // 2 :] = WHITE
    return arr


def quadrant_centres(arr: np.ndarray) -> list[np.ndarray]:
    h, w = arr.shape[:2]
    ys, xs = (h // 4, 3 * h // 4), (w // 4, 3 * w // 4)
    return [arr[ys[0], xs[0]], arr[ys[0], xs[1]], arr[ys[1], xs[0]], arr[ys[1], xs[1]]]


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_bomb(width: int, height: int) -> bytes:
    """A well-formed PNG header (correct CRCs) that claims width×height RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def patch(data: bytes, offset: int, fmt: str, *values: int) -> bytes:
    packed = struct.pack(fmt, *values)
    return data[:offset] + packed + data[offset + len(packed) :]


def jpeg_with_size(width: int, height: int) -> bytes:
    """A real small JPEG whose SOF0 segment is patched to claim width×height."""
    data = save(Image.new("RGB", (8, 8), RED), "JPEG")
    sof = data.index(b"\xff\xc0")
    return patch(data, sof + 5, ">HH", height, width)


def error_of(excinfo: pytest.ExceptionInfo[GuideflowError]) -> dict[str, object]:
    return excinfo.value.to_error_object()


# ----------------------------------------------------------------- decoding: formats


@pytest.mark.parametrize(
    ("fmt", "tolerance"),
    [("PNG", 0), ("BMP", 0), ("GIF", 0), ("JPEG", 12), ("WEBP", 12)],
)
def test_decode_each_format(fmt: str, tolerance: int) -> None:
    arr = quadrants()
    data = save(Image.fromarray(arr), fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    assert sniff_format(data) == fmt
    out = decode_image(data)
    assert out.shape == (40, 60, 3)
    assert out.dtype == np.uint8
    assert out.flags.c_contiguous and out.flags.writeable
    for got, want in zip(quadrant_centres(out), [RED, GREEN, BLUE, WHITE], strict=True):
        assert np.abs(got.astype(int) - want).max() <= tolerance, (fmt, got, want)


def test_animated_gif_decodes_first_frame_only() -> None:
    frames = [Image.new("RGB", (16, 12), c) for c in (RED, BLUE, GREEN)]
    data = save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(io.BytesIO(data)).n_frames == 3  # really animated
    out = decode_image(data)
    assert out.shape == (12, 16, 3)
    assert np.all(out == RED)


def test_animated_webp_decodes_first_frame_only() -> None:
    frames = [Image.new("RGB", (16, 12), c) for c in (BLUE, RED)]
    data = save(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    out = decode_image(data)
    assert np.all(out == BLUE)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF"])
def test_one_pixel_image(fmt: str) -> None:
    out = decode_image(save(Image.new("RGB", (1, 1), WHITE), fmt))
    assert out.shape == (1, 1, 3)
    assert np.all(out >= 250)


def test_exif_orientation_6_rotates_jpeg() -> None:
    """Orientation 6: the stored top row is shown on the right-hand side."""
    stored = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide, 20 tall
    stored[:4] = RED  # top rows red
    stored[4:] = BLUE
    exif = Image.Exif()
    exif[0x0112] = 6
    data = save(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes())
    out = decode_image(data).astype(int)
    assert out.shape == (40, 20, 3)  # portrait now
    assert np.abs(out[:, -1] - RED).max() <= 40  # right column is the red edge
    assert np.abs(out[:, 0] - BLUE).max() <= 40  # left column is blue
    assert np.abs(out[0, 5:15] - BLUE).max() <= 40  # the top row is no longer red


def test_exif_orientation_3_on_png() -> None:
    stored = np.zeros((10, 10, 3), dtype=np.uint8)
    stored[0] = RED
    exif = Image.Exif()
    exif[0x0112] = 3  # rotate 180: top row ends up at the bottom
    out = decode_image(save(Image.fromarray(stored), "PNG", exif=exif.tobytes()))
    assert np.all(out[-1] == RED) and np.all(out[0] == 0)


# ------------------------------------------------------------------- decoding: modes


def test_grayscale_png_is_replicated() -> None:
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    out = decode_image(save(Image.fromarray(gray, "L"), "PNG"))
    assert np.array_equal(out, np.dstack([gray] * 3))


def test_bilevel_png() -> None:
    im = Image.fromarray(np.array([[0, 255]], dtype=np.uint8)).convert("1")
    out = decode_image(save(im, "PNG"))
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, 1].tolist() == [255, 255, 255]


def test_la_png_composited_over_white() -> None:
    la = np.zeros((4, 4, 2), dtype=np.uint8)
    la[..., 0] = 100
    la[..., 1] = [[0, 64, 128, 255]] * 4
    out = decode_image(save(Image.fromarray(la, "LA"), "PNG"))
    rgba = np.dstack([la[..., 0]] * 3 + [la[..., 1]])
    assert np.array_equal(out, reference_hwc3(rgba))
    assert out[0, 0].tolist() == [255, 255, 255]  # fully transparent → white
    assert out[0, 3].tolist() == [100, 100, 100]  # opaque → the grey itself


def test_palette_png_with_transparency() -> None:
    im = Image.new("P", (4, 2))
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black, index 1 red
    im.putdata([0, 1, 0, 1, 1, 1, 0, 0])
    data = save(im, "PNG", transparency=0)  # index 0 is fully transparent
    out = decode_image(data)
    assert out[0, 0].tolist() == list(WHITE)  # transparent black → white, not black
    assert out[0, 1].tolist() == list(RED)


def test_palette_gif_with_transparency() -> None:
    im = Image.new("P", (2, 1))
    im.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    im.putdata([0, 1])
    out = decode_image(save(im, "GIF", transparency=0))
    assert out[0, 0].tolist() == list(WHITE) and out[0, 1].tolist() == list(BLUE)


def test_16bit_gray_png_is_scaled_not_clipped() -> None:
    values = np.array([[65535, 32768, 0, 257, 1000]], dtype=np.uint16)
    data = save(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    out = decode_image(data)
    assert out[0, :, 0].tolist() == [255, 128, 0, 1, 4]  # round(v * 255 / 65535)
    assert np.array_equal(out[..., 0], out[..., 2])


def test_16bit_rgb_png() -> None:
    values = np.zeros((1, 3, 3), dtype=np.uint16)
    values[0, 0] = 65535
    values[0, 1] = 32768
    values[0, 2] = (65535, 0, 0)  # RGB order
    ok, buf = cv2.imencode(".png", values[..., ::-1].copy())  # cv2 writes BGR
    assert ok
    out = decode_image(buf.tobytes())
    assert out[0].tolist() == [[255, 255, 255], [128, 128, 128], [255, 0, 0]]


def test_int32_and_float_modes() -> None:
    """Modes Pillow may hand over for grayscale (I: 16-bit range, F: 0..255 range)."""
    i_img = Image.fromarray(np.array([[65535, 32768, -5, 70000]], dtype=np.int32))
    assert i_img.mode == "I"
    assert imageio._to_rgb(i_img)[0, :, 0].tolist() == [255, 128, 0, 255]
    f_img = Image.fromarray(np.array([[0.4, 127.6, 300.0, -2.0]], dtype=np.float32))
    assert f_img.mode == "F"
    assert imageio._to_rgb(f_img)[0, :, 0].tolist() == [0, 128, 255, 0]


def test_cmyk_jpeg() -> None:
    """Pillow writes CMYK JPEGs Adobe-inverted; decoding must undo that (cyan stays cyan)."""
    data = save(Image.new("CMYK", (16, 16), (255, 0, 0, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode_image(data).astype(int)
    assert np.abs(out[8, 8] - (0, 255, 255)).max() <= 8


def test_rgba_png_composited_exactly_like_hwc3() -> None:
    rng = np.random.default_rng(7)
    rgba = rng.integers(0, 256, (64, 80, 4), dtype=np.uint8)
    rgba[0, 0, 3] = 0
    rgba[0, 1, 3] = 255
    out = decode_image(save(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert np.array_equal(out, reference_hwc3(rgba))
    assert out[0, 0].tolist() == list(WHITE)
    assert out[0, 1].tolist() == rgba[0, 1, :3].tolist()


def test_rgba_webp_composited_over_white() -> None:
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[:, 4:, 3] = 255  # left half transparent red, right half opaque red
    out = decode_image(save(Image.fromarray(rgba, "RGBA"), "WEBP", lossless=True))
    assert np.all(out[:, :4] == WHITE) and np.all(out[:, 4:] == RED)


def test_real_photos_match_controlnet_hwc3(images_dir: Path) -> None:
    """The shared photos are RGBA PNGs: decoding must equal cv2 + HWC3 exactly."""
    paths = sorted(images_dir.glob("*.png"))
    assert paths
    for path in paths:
        bgra = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        rgb_ref = cv2.cvtColor(
            bgra, cv2.COLOR_BGRA2RGBA if bgra.shape[2] == 4 else cv2.COLOR_BGR2RGB
        )
        out = decode_image(path.read_bytes())
        assert np.array_equal(out, reference_hwc3(rgb_ref)), path.name


def test_real_photo_with_alpha_ramp(photo_bytes) -> None:
    """A real photo given a full 0..255 alpha ramp: still bit-identical to HWC3."""
    rgba = np.array(Image.open(io.BytesIO(photo_bytes("room.png"))).convert("RGBA"))
    w = rgba.shape[1]
    rgba[..., 3] = (np.arange(w) * 255 // (w - 1)).astype(np.uint8)[None, :]
    out = decode_image(save(Image.fromarray(rgba, "RGBA"), "PNG"))
    ref = reference_hwc3(rgba)
    assert np.array_equal(out, ref)
    assert not np.array_equal(ref, rgba[..., :3])  # the ramp really changed pixels


# --------------------------------------------------------------------------- hwc3


def test_hwc3_lookup_is_exact_for_every_colour_alpha_pair() -> None:
    colour, alpha = np.meshgrid(np.arange(256), np.arange(256))
    rgba = np.stack([colour, colour, colour, alpha], axis=-1).astype(np.uint8)
    assert np.array_equal(hwc3(rgba), reference_hwc3(rgba))


def test_hwc3_truncates_rather_than_rounds() -> None:
    # colour 0 at alpha 128: 255 * (1 - 128/255) = 126.99... → 126 (round would give 127)
    px = np.array([[[0, 0, 0, 128]]], dtype=np.uint8)
    assert hwc3(px)[0, 0].tolist() == [126, 126, 126]


def test_hwc3_large_image_in_bands_matches_reference() -> None:
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (1500, 1000, 4), dtype=np.uint8)
    rgba[:700, :, 3] = 255  # some fully opaque bands take the fast path
    assert np.array_equal(hwc3(rgba), reference_hwc3(rgba))


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 1), (5, 7, 3), (5, 7, 4)])
def test_hwc3_shapes(shape: tuple[int, ...]) -> None:
    arr = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    out = hwc3(arr)
    assert out.shape == (5, 7, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    assert np.array_equal(out, reference_hwc3(arr))


def test_hwc3_makes_views_contiguous() -> None:
    arr = np.random.default_rng(2).integers(0, 256, (6, 8, 3), dtype=np.uint8)[:, ::2]
    out = hwc3(arr)
    assert out.flags.c_contiguous and np.array_equal(out, arr)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((4, 4, 3), dtype=np.float32),
        np.zeros((4, 4, 2), dtype=np.uint8),
        np.zeros((4, 4, 3, 1), dtype=np.uint8),
        np.zeros((0, 4, 3), dtype=np.uint8),
        np.zeros(4, dtype=np.uint8),
        [[1, 2], [3, 4]],
    ],
    ids=["float", "two-channels", "4d", "empty", "1d", "list"],
)
def test_hwc3_rejects(bad: object) -> None:
    with pytest.raises(InvalidImage) as info:
        hwc3(bad)  # type: ignore[arg-type]
    assert error_of(info)["parameter"] == "inputImage"


# --------------------------------------------------------------- decoding: failures


def test_empty_bytes_is_invalid_image() -> None:
    with pytest.raises(InvalidImage) as info:
        decode_image(b"")
    err = error_of(info)
    assert err["code"] == "invalidImage" and err["parameter"] == "inputImage"
    assert err["message"]


def test_non_bytes_is_invalid_image() -> None:
    with pytest.raises(InvalidImage):
        decode_image("not bytes")  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_image_is_invalid(fmt: str, keep: float) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = save(Image.fromarray(noise), fmt)
    with pytest.raises(InvalidImage) as info:
        decode_image(data[: int(len(data) * keep)])
    assert error_of(info)["parameter"] == "inputImage"


def test_jpeg_missing_only_its_end_marker_is_invalid() -> None:
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    data = save(Image.fromarray(noise), "JPEG")
    assert data.endswith(b"\xff\xd9")
    with pytest.raises(InvalidImage):
        decode_image(data[:-2])


def test_truncated_stays_invalid_even_if_someone_enables_load_truncated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another library flipping Pillow's global must not make us accept half images."""
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # importing imageio did not set it
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = save(Image.fromarray(noise), "PNG")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(GuideflowError):
        decode_image(data[: len(data) // 2])


def test_corrupt_png_body_is_invalid() -> None:
    data = bytearray(save(Image.fromarray(quadrants()), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 8 : idat + 40] = b"\x00" * 32  # clobber the zlib stream
    with pytest.raises(InvalidImage):
        decode_image(bytes(data))


def test_text_named_jpg_is_unsupported_format(tmp_path: Path) -> None:
    """Decoding looks at bytes, never names: a text file called .jpg is reported as text."""
    path = tmp_path / "photo.jpg"
    path.write_text("this is not really a JPEG, just some words\n")
    with pytest.raises(UnsupportedImageFormat) as info:
        decode_image(path.read_bytes())
    err = error_of(info)
    assert err["code"] == "unsupportedImageFormat" and err["parameter"] == "inputImage"
    assert "text" in str(err["message"])


def test_svg_is_unsupported_format() -> None:
    svg = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10"/>'
    with pytest.raises(UnsupportedImageFormat) as info:
        decode_image(svg)
    message = str(error_of(info)["message"])
    assert "SVG" in message
    assert "PNG, JPEG, WEBP, BMP, GIF" in message


def test_tiff_is_unsupported_format() -> None:
    data = save(Image.fromarray(quadrants()), "TIFF")
    assert sniff_format(data) is None
    with pytest.raises(UnsupportedImageFormat) as info:
        decode_image(data)
    assert "TIFF" in str(error_of(info)["message"])


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "PDF"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "HEIC"),
        (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1", "AVIF"),
        (b"<!DOCTYPE html><html><body>404</body></html>", "HTML"),
        (b"PK\x03\x04\x14\x00\x00\x00", "ZIP"),
        (b"data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAA", "data URI"),
        (b"iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAA", "base64"),
    ],
    ids=["pdf", "heic", "avif", "html", "zip", "data-uri", "base64"],
)
def test_other_recognisable_inputs_are_unsupported(data: bytes, kind: str) -> None:
    with pytest.raises(UnsupportedImageFormat) as info:
        decode_image(data)
    assert kind in str(error_of(info)["message"])


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x01\x02\x03\xfe\xfd\xfc garbage \x80\x81",
        b"\x89PNG",  # a cut-off signature
        b"\xff\xd8\xff\xe0" + b"\x00" * 10,  # JPEG magic, nothing behind it
        b"GIF89a\x01",
        b"BM\x00\x00",  # too short to be a BMP
    ],
    ids=["binary-noise", "png-signature-prefix", "jpeg-magic-only", "gif-magic-only", "bm"],
)
def test_unrecognisable_or_broken_data_is_invalid_image(data: bytes) -> None:
    with pytest.raises(InvalidImage):
        decode_image(data)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF"])
def test_corrupted_bytes_only_ever_raise_typed_errors(fmt: str) -> None:
    """Deterministic mini-fuzz: flipped header/body bytes and cuts give RGB or a typed error."""
    rng = np.random.default_rng(11)
    rgba = rng.integers(0, 256, (24, 32, 4), dtype=np.uint8)
    im = Image.fromarray(rgba, "RGBA")
    data = save(im.convert("RGB") if fmt == "JPEG" else im, fmt)
    for _ in range(150):
        mutated = bytearray(data)
        for _ in range(int(rng.integers(1, 6))):
            limit = min(len(mutated), 200) if rng.random() < 0.7 else len(mutated)
            mutated[int(rng.integers(0, limit))] = int(rng.integers(0, 256))
        if rng.random() < 0.3:
            mutated = mutated[: int(rng.integers(1, len(mutated)))]
        try:
            out = decode_image(bytes(mutated))
        except GuideflowError as e:
            assert e.parameter == "inputImage"
            assert e.code in {"invalidImage", "unsupportedImageFormat", "imageTooLarge"}
        else:
            assert out.ndim == 3 and out.shape[2] == 3 and out.dtype == np.uint8


def test_sniff_format() -> None:
    assert sniff_format(b"") is None
    assert sniff_format(b"BM is how this text starts") is None  # "BM" alone is not a BMP
    assert sniff_format(b"RIFF\x00\x00\x00\x00WAVEfmt ") is None
    assert sniff_format(save(Image.new("RGB", (2, 2)), "BMP")) == "BMP"


# ---------------------------------------------------------------------------- limits


def decode_with_peak_memory(data: bytes) -> tuple[GuideflowError, int]:
    tracemalloc.start()
    try:
        try:
            decode_image(data)
        except GuideflowError as e:
            error = e
        else:
            pytest.fail("decode_image accepted a decompression bomb")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return error, peak


def test_png_bomb_header_is_rejected_before_decoding() -> None:
    """IHDR claims 100000×100000 (10 gigapixels); only a few KB of data follow.

    A full decode would fail as truncated (invalidImage) after trying to allocate 30 GB;
    imageTooLarge proves the header alone was used, and tracemalloc bounds the memory.
    """
    data = png_bomb(100_000, 100_000)
    assert len(data) < 1000
    error, peak = decode_with_peak_memory(data)
    assert isinstance(error, ImageTooLarge)
    assert error.to_error_object()["parameter"] == "inputImage"
    assert "100000" in error.message
    assert peak < 50 * 1024 * 1024


@pytest.mark.parametrize(
    ("name", "make"),
    [
        # JPEG goes through Pillow's lazy open; 60000² also trips Pillow's own bomb error.
        ("jpeg-huge", lambda: jpeg_with_size(60_000, 60_000)),
        # 10000² = 100 Mpx: above our limit, inside Pillow's warning band (89..179 Mpx).
        ("jpeg-warning-band", lambda: jpeg_with_size(10_000, 10_000)),
        # 9000×6000 = 54 Mpx: only our 50 Mpx limit catches it.
        ("jpeg-just-over", lambda: jpeg_with_size(9_000, 6_000)),
        (
            "gif",
            lambda: patch(save(Image.new("RGB", (4, 4), RED), "GIF"), 6, "<HH", 65535, 65535),
        ),
        (
            "bmp",
            lambda: patch(save(Image.new("RGB", (4, 4), RED), "BMP"), 18, "<ii", 20000, 20000),
        ),
        (
            "webp",
            lambda: patch(save(Image.new("RGB", (4, 4), RED), "WEBP"), 26, "<HH", 16383, 16383),
        ),
    ],
)
def test_header_bombs_of_every_format(name: str, make) -> None:
    data = make()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        error, peak = decode_with_peak_memory(data)
    assert isinstance(error, ImageTooLarge), (name, error)
    assert peak < 50 * 1024 * 1024
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_custom_pixel_limit() -> None:
    data = save(Image.new("RGB", (100, 100), GREEN), "PNG")
    with pytest.raises(ImageTooLarge) as info:
        decode_image(data, ImageLimits(max_pixels=100 * 100 - 1))
    assert error_of(info)["parameter"] == "inputImage"
    assert decode_image(data, ImageLimits(max_pixels=100 * 100)).shape == (100, 100, 3)


def test_custom_pixel_limit_applies_to_jpeg() -> None:
    data = save(Image.new("RGB", (100, 100), GREEN), "JPEG")
    with pytest.raises(ImageTooLarge):
        decode_image(data, ImageLimits(max_pixels=5000))


def test_byte_limit_is_checked_first() -> None:
    data = save(Image.new("RGB", (10, 10), GREEN), "PNG")
    with pytest.raises(ImageTooLarge) as info:
        decode_image(data, ImageLimits(max_bytes=len(data) - 1))
    assert error_of(info)["parameter"] == "inputImage"
    assert decode_image(data, ImageLimits(max_bytes=len(data))).shape == (10, 10, 3)
    # Before any sniffing: oversized text is "too large", not "unsupported".
    with pytest.raises(ImageTooLarge):
        decode_image(b"x" * 100, ImageLimits(max_bytes=10))


def test_default_limits() -> None:
    assert ImageLimits(max_pixels=50_000_000, max_bytes=50 * 1024 * 1024) == DEFAULT_LIMITS
    with pytest.raises(ValueError):
        ImageLimits(max_pixels=0)


# -------------------------------------------------------------------------- encoding


def smooth_image(w: int = 96, h: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.dstack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) % 256]).astype(np.uint8)


def test_png_round_trip_is_exact() -> None:
    arr = np.random.default_rng(5).integers(0, 256, (33, 47, 3), dtype=np.uint8)
    data = encode_image(arr, "PNG")
    assert sniff_format(data) == "PNG"
    assert np.array_equal(decode_image(data), arr)


def test_png_ignores_quality() -> None:
    arr = smooth_image()
    assert encode_image(arr, "PNG", 20) == encode_image(arr, "PNG", 99)


def test_gray_2d_png_round_trip() -> None:
    gray = np.random.default_rng(6).integers(0, 256, (20, 30), dtype=np.uint8)
    assert np.array_equal(decode_image(encode_image(gray, "PNG")), np.dstack([gray] * 3))


@pytest.mark.parametrize(("fmt", "magic"), [("JPG", "JPEG"), ("WEBP", "WEBP")])
def test_lossy_round_trip_and_quality(fmt: str, magic: str) -> None:
    arr = smooth_image()
    high = encode_image(arr, fmt, 95)
    low = encode_image(arr, fmt, 25)
    assert sniff_format(high) == magic and sniff_format(low) == magic
    assert len(low) < len(high)
    back = decode_image(high)
    assert back.shape == arr.shape
    assert np.abs(back.astype(int) - arr).mean() < 3


@pytest.mark.parametrize("fmt", ["PNG", "JPG", "WEBP"])
def test_encode_keeps_rgb_channel_order(fmt: str) -> None:
    arr = np.zeros((16, 16, 3), dtype=np.uint8)
    arr[...] = RED
    back = decode_image(encode_image(arr, fmt, 95)).astype(int)
    assert np.abs(back[8, 8] - RED).max() <= 10


def test_encode_accepts_format_aliases() -> None:
    arr = smooth_image(8, 8)
    assert sniff_format(encode_image(arr, "jpeg")) == "JPEG"
    assert sniff_format(encode_image(arr, "webp", 50)) == "WEBP"


def test_encode_rejects_bad_arguments() -> None:
    with pytest.raises(InvalidParameter) as info:
        encode_image(smooth_image(8, 8), "gif")
    assert error_of(info)["parameter"] == "outputFormat"
    with pytest.raises(InvalidParameter) as info:
        encode_image(smooth_image(8, 8), "JPG", 100)
    assert error_of(info)["parameter"] == "outputQuality"
    with pytest.raises(ValueError):
        encode_image(np.zeros((4, 4, 3), dtype=np.float32), "PNG")


@pytest.mark.parametrize(
    ("value", "fmt", "mime", "ext"),
    [
        ("JPG", "JPG", "image/jpeg", "jpg"),
        ("jpeg", "JPG", "image/jpeg", "jpg"),
        ("Jpg", "JPG", "image/jpeg", "jpg"),
        ("png", "PNG", "image/png", "png"),
        (" PNG ", "PNG", "image/png", "png"),
        ("WebP", "WEBP", "image/webp", "webp"),
    ],
)
def test_formats(value: str, fmt: str, mime: str, ext: str) -> None:
    assert normalize_format(value) == fmt
    assert content_type(value) == mime
    assert file_extension(value) == ext


@pytest.mark.parametrize("value", ["gif", "tiff", "", "jpgg", None, 3, b"PNG"])
def test_normalize_format_rejects(value: object) -> None:
    with pytest.raises(InvalidParameter) as info:
        normalize_format(value)
    err = error_of(info)
    assert err["code"] == "invalidParameter" and err["parameter"] == "outputFormat"
    assert "JPG, PNG, WEBP" in str(err["message"])


@pytest.mark.parametrize(
    ("value", "expected"), [(20, 20), (99, 99), (75, 75), (80.0, 80), ("85", 85)]
)
def test_validate_quality_accepts(value: object, expected: int) -> None:
    assert validate_quality(value) == expected


@pytest.mark.parametrize("value", [19, 100, 0, -50, True, False, 50.5, "high", None, [90]])
def test_validate_quality_rejects(value: object) -> None:
    with pytest.raises(InvalidParameter) as info:
        validate_quality(value)
    err = error_of(info)
    assert err["code"] == "invalidParameter" and err["parameter"] == "outputQuality"
    assert "20" in str(err["message"]) and "99" in str(err["message"])
