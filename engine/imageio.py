"""The one image I/O module of guideflow: decode, normalise, resize and encode.

Engine, server, client and pipeline all go through here, so every input image is
treated the same way everywhere:

* :func:`decode_image` turns untrusted bytes into an ``H×W×3`` uint8 RGB array, or
  raises a typed :class:`~guideflow.errors.GuideflowError` (parameter ``inputImage``).
  It accepts PNG, JPEG, WEBP, BMP and GIF (first frame), applies the EXIF
  orientation, and converts every pixel mode to 8-bit RGB, compositing alpha over
  white exactly like ControlNet's ``HWC3`` (so canny & co. are pixel-identical to
  the reference annotators). Limits are enforced before any pixel is decoded.
* :func:`hwc3` is the same normalisation for arrays that are already decoded.
* :func:`target_size` / :func:`resize_to` implement Runware's ``width``/``height``
  semantics: they only ever *downscale*.
* :func:`encode_image` writes the guide image as JPG, PNG or WEBP (OpenCV, fast),
  with :func:`normalize_format`, :func:`validate_quality`, :func:`content_type` and
  :func:`file_extension` for the protocol fields around it.

Decoding is done with Pillow because it tells us the size from the header alone
(``Image.open`` is lazy), handles EXIF, palettes, CMYK and 16-bit modes, and raises
on truncated data. Encoding is done with OpenCV because it is several times faster.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import io
import math
import numbers
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageFile, ImageOps

from guideflow.errors import (
    GuideflowError,
    ImageTooLarge,
    InvalidImage,
    InvalidParameter,
    UnsupportedImageFormat,
)

__all__ = [
    "DEFAULT_LIMITS",
    "MAX_DIMENSION",
    "MAX_QUALITY",
    "MIN_QUALITY",
    "OUTPUT_FORMATS",
    "SUPPORTED_INPUT_FORMATS",
    "ImageLimits",
    "content_type",
    "decode_image",
    "encode_image",
    "file_extension",
    "hwc3",
    "normalize_format",
    "resize_to",
    "sniff_format",
    "target_size",
    "validate_dimension",
    "validate_quality",
]

INPUT_PARAMETER = "inputImage"
SUPPORTED_INPUT_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
_SUPPORTED_TEXT = "PNG, JPEG, WEBP, BMP, GIF"

OUTPUT_FORMATS: tuple[str, ...] = ("JPG", "PNG", "WEBP")
_FORMAT_ALIASES = {"JPG": "JPG", "JPEG": "JPG", "PNG": "PNG", "WEBP": "WEBP"}
_CONTENT_TYPES = {"JPG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
_EXTENSIONS = {"JPG": "jpg", "PNG": "png", "WEBP": "webp"}

MIN_QUALITY = 20
MAX_QUALITY = 99
MAX_DIMENSION = 16384
# zlib level for PNG output: guides are mostly edge maps that compress well even at a
# low level; 2 is about as fast as 1 and noticeably smaller on edge maps.
PNG_COMPRESSION = 2

# Exceptions Pillow (and the codecs under it) raise for data it cannot parse or decode.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes UnidentifiedImageError and "image file is truncated"
    SyntaxError,
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    EOFError,
    struct.error,
    zlib.error,
)


@dataclass(frozen=True)
class ImageLimits:
    """Decompression-bomb guard: the largest input accepted, in pixels and in bytes."""

    max_pixels: int = 50_000_000
    max_bytes: int = 50 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ImageLimits.{name} must be a positive int, got {value!r}")


DEFAULT_LIMITS = ImageLimits()


# --------------------------------------------------------------------------------------
# Format sniffing
# --------------------------------------------------------------------------------------

# DIB header sizes a real BMP can carry (core, v2/v3 info, v4, v5, OS/2 2.x).
_BMP_DIB_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})


def sniff_format(data: bytes) -> str | None:
    """The supported image format ``data`` starts with, from magic bytes alone.

    Returns ``"PNG"``, ``"JPEG"``, ``"WEBP"``, ``"BMP"``, ``"GIF"`` or ``None``
    (anything else, including formats we recognise but do not decode).
    """
    head = bytes(data[:32])
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    # "BM" alone is too weak (text can start with it): also require a known DIB size.
    if head[:2] == b"BM" and len(head) >= 18 and _u32le(head, 14) in _BMP_DIB_SIZES:
        return "BMP"
    return None


# (prefix, offset, kind) for recognisable files that are not images we decode.
_OTHER_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"II+\x00", 0, "BigTIFF"),
    (b"MM\x00+", 0, "BigTIFF"),
    (b"%PDF", 0, "PDF"),
    (b"%!PS", 0, "PostScript"),
    (b"\xc5\xd0\xd3\xc6", 0, "EPS"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", 0, "JPEG 2000"),
    (b"\xff\x4f\xff\x51", 0, "JPEG 2000"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", 0, "JPEG XL"),
    (b"\xff\x0a", 0, "JPEG XL"),
    (b"8BPS", 0, "Photoshop PSD"),
    (b"gimp xcf", 0, "GIMP XCF"),
    (b"v/1\x01", 0, "OpenEXR"),
    (b"#?RADIANCE", 0, "Radiance HDR"),
    (b"qoif", 0, "QOI"),
    (b"DDS ", 0, "DDS"),
    (b"\x00\x00\x01\x00", 0, "ICO"),
    (b"\x00\x00\x02\x00", 0, "CUR"),
    (b"PK\x03\x04", 0, "ZIP archive"),
    (b"\x1f\x8b", 0, "gzip data (e.g. SVGZ)"),
    (b"7z\xbc\xaf\x27\x1c", 0, "7z archive"),
    (b"Rar!\x1a\x07", 0, "RAR archive"),
    (b"WAVE", 8, "WAV audio"),
    (b"AVI ", 8, "AVI video"),
)

# ISO-BMFF brands (bytes 8..12 after "ftyp" at 4..8).
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})


def _detect_unsupported(data: bytes) -> str | None:
    """Name the kind of a recognisable non-image / unsupported-image input, else ``None``."""
    head = bytes(data[:64])
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _HEIF_BRANDS:
            return "HEIC/HEIF"
        if brand in _AVIF_BRANDS:
            return "AVIF"
        return "MP4/QuickTime media"
    for prefix, offset, kind in _OTHER_SIGNATURES:
        if head[offset : offset + len(prefix)] == prefix:
            return kind
    if len(head) >= 3 and head[0:1] == b"P" and head[1:2] in b"1234567" and head[2:3].isspace():
        return "PNM (PBM/PGM/PPM)"
    return _detect_text(data)


def _detect_text(data: bytes) -> str | None:
    """``"SVG"``, ``"HTML"``, ``"XML"``, a base64 hint or ``"text"`` if ``data`` reads as text."""
    head = bytes(data[:4096])
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "text (UTF-16)"
    if head.startswith(codecs.BOM_UTF8):
        head = head[len(codecs.BOM_UTF8) :]
    try:
        # Incremental decoding tolerates a multi-byte character cut off at the 4 KiB mark.
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return None
    if not text.strip() or not all(c.isprintable() or c in "\t\n\r\f\v" for c in text):
        return None
    stripped = text.lstrip()
    lower = stripped[:4096].lower()
    if stripped.startswith("<"):
        if "<svg" in lower:
            return "SVG"
        if lower.startswith(("<!doctype html", "<html")):
            return "HTML"
        return "XML"
    if lower.startswith("data:"):
        return "data URI text (send the decoded image bytes)"
    inner = _base64_sniff(stripped)
    if inner is not None:
        return f"base64 text of a {inner} (send the decoded image bytes)"
    return "text"


def _base64_sniff(text: str) -> str | None:
    """If ``text`` starts like base64 of a supported image, the format it encodes."""
    try:
        head = text[:44]
        raw = base64.b64decode(head[: len(head) // 4 * 4], validate=True)
    except (binascii.Error, ValueError):
        return None
    return sniff_format(raw)


# --------------------------------------------------------------------------------------
# Header-only size (bounded work, before Pillow allocates anything)
# --------------------------------------------------------------------------------------


def _u16le(b: bytes, i: int) -> int:
    return int.from_bytes(b[i : i + 2], "little")


def _u24le(b: bytes, i: int) -> int:
    return int.from_bytes(b[i : i + 3], "little")


def _u32le(b: bytes, i: int) -> int:
    return int.from_bytes(b[i : i + 4], "little")


def _header_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """Width and height from the fixed-offset header of PNG/GIF/BMP/WEBP, else ``None``.

    This rejects bombs before Pillow parses anything (libwebp, for one, allocates the
    whole canvas when the decoder is created). JPEG's size sits behind a variable number
    of segments; Pillow's lazy ``open`` finds it without decoding pixels, which is enough.
    """
    head = bytes(data[:32])
    if fmt == "PNG" and len(head) >= 24 and head[12:16] == b"IHDR":
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if fmt == "GIF" and len(head) >= 10:
        return _u16le(head, 6), _u16le(head, 8)
    if fmt == "BMP" and len(head) >= 26:
        if _u32le(head, 14) == 12:  # OS/2 core header: 16-bit unsigned dimensions
            return _u16le(head, 18), _u16le(head, 20)
        w, h = struct.unpack_from("<ii", head, 18)
        return abs(w), abs(h)  # negative height means top-down rows
    if fmt == "WEBP" and len(head) >= 30:
        chunk = head[12:16]
        if chunk == b"VP8X":
            return _u24le(head, 24) + 1, _u24le(head, 27) + 1
        if chunk == b"VP8L" and head[20] == 0x2F:
            bits = _u32le(head, 21)
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
            return _u16le(head, 26) & 0x3FFF, _u16le(head, 28) & 0x3FFF
    return None


def _check_pixels(size: tuple[int, int], limits: ImageLimits) -> None:
    """Raise ``imageTooLarge`` if ``size`` (w, h) has more pixels than allowed."""
    w, h = size
    if w * h > limits.max_pixels:
        raise ImageTooLarge(
            f"The image is {w}×{h} = {w * h:,} pixels; the limit is {limits.max_pixels:,}.",
            parameter=INPUT_PARAMETER,
        )


# --------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------


def decode_image(data: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Decode untrusted image bytes into a C-contiguous, writable ``H×W×3`` uint8 RGB array.

    Checks, in order (each failure is a typed error with parameter ``inputImage``):

    1. size in bytes ≤ ``limits.max_bytes`` (``imageTooLarge``); empty → ``invalidImage``;
    2. the format, sniffed from magic bytes: PNG, JPEG, WEBP, BMP, GIF are decoded;
       SVG, TIFF, PDF, HEIC, text and other recognisable files → ``unsupportedImageFormat``;
       anything unrecognisable → ``invalidImage``;
    3. width × height ≤ ``limits.max_pixels``, read from the header only, before any
       pixel is decoded (``imageTooLarge``);
    4. a full decode of the first frame; truncated or corrupt data → ``invalidImage``.

    Then the EXIF orientation is applied and the pixels are converted to 8-bit RGB
    (see :func:`_to_rgb`): alpha is composited over white exactly like ControlNet's HWC3.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidImage(
            f"The image must be bytes, got {type(data).__name__}.", parameter=INPUT_PARAMETER
        )
    data = bytes(data)
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(
            f"The image is {len(data):,} bytes; the limit is {limits.max_bytes:,} bytes.",
            parameter=INPUT_PARAMETER,
        )
    if not data:
        raise InvalidImage("The image is empty (0 bytes).", parameter=INPUT_PARAMETER)

    fmt = sniff_format(data)
    if fmt is None:
        kind = _detect_unsupported(data)
        if kind is not None:
            raise UnsupportedImageFormat(
                f"Unsupported input format: {kind}. Supported formats: {_SUPPORTED_TEXT}.",
                parameter=INPUT_PARAMETER,
            )
        raise InvalidImage(
            f"The input is not a recognisable image (supported: {_SUPPORTED_TEXT}).",
            parameter=INPUT_PARAMETER,
        )

    header = _header_size(data, fmt)
    if header is not None:
        _check_pixels(header, limits)

    try:
        rgb = _decode_with_pillow(data, fmt, limits)
    except GuideflowError:
        raise
    except MemoryError as e:
        raise ImageTooLarge(
            "The image is too large to decode in the available memory.",
            parameter=INPUT_PARAMETER,
        ) from e
    except _DECODE_ERRORS as e:
        raise InvalidImage(
            f"The {fmt} image is truncated or corrupt: {e}", parameter=INPUT_PARAMETER
        ) from e
    return rgb


def _decode_with_pillow(data: bytes, fmt: str, limits: ImageLimits) -> np.ndarray:
    """Open lazily, check the real size, decode the first frame, orient, convert to RGB.

    Pillow's own decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``) is left as the
    process configured it; its warning is silenced here because :class:`ImageLimits`
    is enforced instead, and its error becomes ``imageTooLarge``. The warning filter is
    scoped to this call; under concurrent calls the worst a ``catch_warnings`` race can
    do is leave that one ignore-filter installed, which is harmless.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=[fmt]) as im:
                _check_pixels(im.size, limits)
                if im.width < 1 or im.height < 1:
                    raise InvalidImage("The image has no pixels.", parameter=INPUT_PARAMETER)
                _require_strict_loading()
                im.load()  # first frame only: GIF/WEBP/APNG frames after it are never read
                _apply_exif_orientation(im)
                return _to_rgb(im)
        except Image.DecompressionBombError as e:
            raise ImageTooLarge(str(e), parameter=INPUT_PARAMETER) from e


def _require_strict_loading() -> None:
    """Refuse to decode if other code enabled Pillow's global ``LOAD_TRUNCATED_IMAGES``.

    With it on, a truncated upload decodes "successfully" with a grey bottom and yields
    a wrong guide; failing loudly is better than silently producing millions of those.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise GuideflowError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES was enabled by other code in this process; "
            "guideflow needs it False to reject truncated images."
        )


def _apply_exif_orientation(im: Image.Image) -> None:
    """Rotate/flip ``im`` in place per its EXIF orientation; malformed EXIF is ignored.

    A broken EXIF block should not cost an otherwise decodable image: it is then used
    as stored, which is what most viewers do too.
    """
    try:
        ImageOps.exif_transpose(im, in_place=True)
    except (*_DECODE_ERRORS, AttributeError):
        pass


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Any Pillow mode → 8-bit RGB array.

    * RGB → as is; L/1 → gray replicated; alpha (RGBA, LA, P/PA with transparency,
      premultiplied RGBa/La) → RGBA, then composited over white by :func:`hwc3`.
    * I;16* (16-bit grayscale PNG) and I (32-bit int, 16-bit range in our formats) →
      scaled to 0..255 with rounding: ``round(v * 255 / 65535)``. (Pillow itself already
      reduces 16-bit RGB/RGBA PNGs to 8 bit by taking the high byte.)
    * F (float) → Pillow's F→L convention: values on a 0..255 scale, rounded and clipped.
    * CMYK (incl. Adobe-inverted JPEG, handled by Pillow), YCbCr, LAB, HSV... → RGB.
    """
    mode = im.mode
    if mode == "RGB":
        return np.array(im, dtype=np.uint8, order="C")
    if mode.startswith("I;16") or mode == "I":
        v = np.asarray(im).astype(np.int64)
        v = np.clip(v, 0, 65535)
        return hwc3(((v * 255 + 32767) // 65535).astype(np.uint8))
    if mode == "F":
        f = np.nan_to_num(np.asarray(im, dtype=np.float32), nan=0.0)
        return hwc3(np.clip(np.rint(f), 0, 255).astype(np.uint8))
    if mode in ("L", "1"):
        return hwc3(np.asarray(im.convert("L") if mode == "1" else im, dtype=np.uint8))
    if im.has_transparency_data or "A" in im.getbands() or "a" in im.getbands():
        rgba = im if mode == "RGBA" else im.convert("RGBA")
        return hwc3(np.asarray(rgba, dtype=np.uint8))
    return np.array(im.convert("RGB"), dtype=np.uint8, order="C")


def _validate_array(arr: Any) -> np.ndarray:
    """Raise ``invalidImage`` unless ``arr`` is a non-empty H×W[×1|3|4] uint8 array."""
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8:
        got = arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__
        raise InvalidImage(f"Image arrays must be uint8, got {got}.", parameter=INPUT_PARAMETER)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise InvalidImage(
            f"Image arrays must be H×W, H×W×1, H×W×3 or H×W×4, got shape {arr.shape}.",
            parameter=INPUT_PARAMETER,
        )
    return arr


def _composite_lut() -> np.ndarray:
    """``lut[a, c]`` = ControlNet's HWC3 result for colour ``c`` under alpha ``a``.

    Built with the very same float32 expression HWC3 applies per element, so looking it
    up is bit-identical to computing it, and about 4× faster with far less memory.
    """
    color = np.arange(256, dtype=np.uint8)[None, :].astype(np.float32)
    alpha = np.arange(256, dtype=np.uint8)[:, None].astype(np.float32) / 255.0
    y = color * alpha + 255.0 * (1.0 - alpha)
    return np.ascontiguousarray(y.clip(0, 255).astype(np.uint8)).ravel()


_COMPOSITE_LUT = _composite_lut()
_BAND_PIXELS = 1 << 20  # rows are composited in bands of about this many pixels


def _composite_over_white(rgba: np.ndarray) -> np.ndarray:
    """H×W×4 uint8 → H×W×3 uint8, identical to ``HWC3``'s float32 alpha blend over white."""
    h, w = rgba.shape[:2]
    out = np.empty((h, w, 3), dtype=np.uint8)
    rows = max(1, _BAND_PIXELS // w)
    for y0 in range(0, h, rows):
        band = rgba[y0 : y0 + rows]
        alpha = band[:, :, 3:4]
        if alpha.min() == 255:  # opaque: the blend is the identity
            out[y0 : y0 + rows] = band[:, :, :3]
            continue
        index = (alpha.astype(np.uint16) << 8) | band[:, :, :3]
        np.take(_COMPOSITE_LUT, index, out=out[y0 : y0 + rows], mode="clip")
    return out


def hwc3(arr: np.ndarray) -> np.ndarray:
    """ControlNet's ``HWC3`` for decoded arrays: any uint8 H×W[×1|3|4] → C-contiguous H×W×3.

    Gray is replicated to three channels; RGBA is composited over white as
    ``(color * a + 255 * (1 - a)).clip(0, 255).astype(uint8)`` in float32 with
    ``a = alpha / 255`` (truncation, not rounding). An H×W×3 C-contiguous input is
    returned as is. Anything else raises ``invalidImage`` (parameter ``inputImage``).
    """
    arr = _validate_array(arr)
    channels = arr.shape[2]
    if channels == 3:
        return np.ascontiguousarray(arr)
    if channels == 1:
        return np.ascontiguousarray(np.repeat(arr, 3, axis=2))
    return _composite_over_white(arr)


# --------------------------------------------------------------------------------------
# Resize (Runware's width/height semantics)
# --------------------------------------------------------------------------------------


def _as_int(value: Any) -> int | None:
    """``value`` as an int if it denotes one exactly (``512``, ``512.0``, ``"512"``), else None.

    Booleans are never integers here, even though Python says ``True == 1``.
    """
    if isinstance(value, bool | np.bool_):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                return None
    if isinstance(value, numbers.Real):
        f = float(value)
        return int(f) if math.isfinite(f) and f.is_integer() else None
    return None


def validate_dimension(value: Any, name: str) -> int | None:
    """Validate an optional ``width``/``height``: None, or an integer in 1..MAX_DIMENSION.

    Integral floats and numeric strings (``512.0``, ``"512"``) are accepted; booleans,
    zero, negatives, fractions and other strings raise ``invalidParameter`` with
    ``parameter=name``.
    """
    if value is None:
        return None
    n = _as_int(value)
    if n is None or n < 1:
        raise InvalidParameter(
            f"{name} must be a positive integer number of pixels, got {value!r}.",
            parameter=name,
        )
    if n > MAX_DIMENSION:
        raise InvalidParameter(
            f"{name} must be at most {MAX_DIMENSION} pixels, got {n}.", parameter=name
        )
    return n


def _round_div(num: int, den: int) -> int:
    """``num / den`` rounded half up, in exact integer arithmetic (both non-negative)."""
    return (2 * num + den) // (2 * den)


def target_size(
    in_w: int, in_h: int, width: int | None = None, height: int | None = None
) -> tuple[int, int]:
    """The (width, height) a guide is produced at, given the input size and the request.

    Runware's semantics: ``width``/``height`` only ever *downscale*, never upscale, and
    there is no forced 512 or multiple of 64.

    * neither given → the input size;
    * only ``width`` → if the input is wider, ``(width, round(in_h * width / in_w))``
      (aspect ratio kept, rounded half up, at least 1), else unchanged;
    * only ``height`` → the same on the other axis;
    * both → each axis clamped on its own: ``(min(in_w, width), min(in_h, height))``, so a
      larger input comes out at exactly width×height and a smaller axis is left as is.
    """
    if width is not None and height is not None:
        return min(in_w, width), min(in_h, height)
    if width is not None and in_w > width:
        return width, max(1, _round_div(in_h * width, in_w))
    if height is not None and in_h > height:
        return max(1, _round_div(in_w * height, in_h)), height
    return in_w, in_h


def resize_to(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Downscale ``arr`` to ``size`` = (width, height) with ``INTER_AREA``.

    Returns ``arr`` itself (same object) when it already has that size. Growing an axis
    is a caller bug (:func:`target_size` never asks for it) and raises ``ValueError``.
    """
    w, h = int(size[0]), int(size[1])
    in_h, in_w = arr.shape[:2]
    if (w, h) == (in_w, in_h):
        return arr
    if not (1 <= w <= in_w and 1 <= h <= in_h):
        raise ValueError(f"resize_to only downscales: {in_w}×{in_h} → {w}×{h}")
    return cv2.resize(arr, (w, h), interpolation=cv2.INTER_AREA)


# --------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------


def normalize_format(value: Any) -> str:
    """``outputFormat`` → ``"JPG"``, ``"PNG"`` or ``"WEBP"`` (jpg/jpeg/png/webp, any case)."""
    fmt = _FORMAT_ALIASES.get(value.strip().upper()) if isinstance(value, str) else None
    if fmt is None:
        raise InvalidParameter(
            f"outputFormat must be one of JPG, PNG, WEBP, got {value!r}.",
            parameter="outputFormat",
        )
    return fmt


def validate_quality(value: Any) -> int:
    """``outputQuality`` → an int in 20..99 (JPG/WEBP only; PNG is lossless).

    The default (95) is the caller's business: ``None`` is rejected like any non-integer.
    """
    n = _as_int(value)
    if n is None or not MIN_QUALITY <= n <= MAX_QUALITY:
        raise InvalidParameter(
            f"outputQuality must be an integer from {MIN_QUALITY} to {MAX_QUALITY}, got {value!r}.",
            parameter="outputQuality",
        )
    return n


def content_type(fmt: str) -> str:
    """The MIME type of an output format: ``image/jpeg``, ``image/png`` or ``image/webp``."""
    return _CONTENT_TYPES[normalize_format(fmt)]


def file_extension(fmt: str) -> str:
    """The file extension (no dot) of an output format: ``jpg``, ``png`` or ``webp``."""
    return _EXTENSIONS[normalize_format(fmt)]


def encode_image(arr: np.ndarray, fmt: str = "PNG", quality: int = 95) -> bytes:
    """Encode an ``H×W×3`` RGB (or ``H×W`` gray) uint8 array as JPG, PNG or WEBP bytes.

    Uses OpenCV (RGB is swapped to BGR first). ``quality`` (20..99) applies to JPG and
    WEBP; PNG is lossless at zlib level :data:`PNG_COMPRESSION`, chosen for speed.
    """
    fmt = normalize_format(fmt)
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8:
        raise ValueError("encode_image expects a uint8 numpy array")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 3 and arr.shape[2] == 3:
        img = cv2.cvtColor(np.ascontiguousarray(arr), cv2.COLOR_RGB2BGR)
    elif arr.ndim == 2:
        img = np.ascontiguousarray(arr)
    else:
        raise ValueError(f"encode_image expects H×W×3 or H×W, got shape {arr.shape}")
    if fmt == "PNG":
        ext, params = ".png", [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION]
    elif fmt == "JPG":
        ext, params = ".jpg", [cv2.IMWRITE_JPEG_QUALITY, validate_quality(quality)]
    else:
        ext, params = ".webp", [cv2.IMWRITE_WEBP_QUALITY, validate_quality(quality)]
    ok, buf = cv2.imencode(ext, img, params)
    if not ok:
        raise GuideflowError(f"OpenCV failed to encode a {img.shape} image as {fmt}.")
    return buf.tobytes()


# --------------------------------------------------------------------------------------
# Image references in the protocol: UUID, data URI, raw base64 or URL
# --------------------------------------------------------------------------------------

ImageRefKind = str  # "uuid" | "dataURI" | "url" | "base64"
_DATA_URI_MEDIA_TYPES = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/jpg": "JPEG",
    "image/webp": "WEBP",
    "image/bmp": "BMP",
    "image/gif": "GIF",
}


def classify_image_ref(ref: str) -> ImageRefKind:
    """What kind of reference a protocol ``inputImage`` / ``inputs.image`` string is.

    A UUID (an uploaded or generated image), a ``data:`` URI, an ``http(s)``/other
    URL (``scheme://``), or else raw base64.
    """
    import uuid as _uuid

    text = ref.strip()
    if len(text) == 36:
        try:
            _uuid.UUID(text)
            return "uuid"
        except ValueError:
            pass
    if text[:5].lower() == "data:":
        return "dataURI"
    head = text[:16].lower()
    if "://" in head:
        return "url"
    return "base64"


def decode_base64_image(text: str, *, parameter: str = INPUT_PARAMETER) -> bytes:
    """Strict base64 → bytes (whitespace ignored, padding optional); ``invalidImage`` if bad."""
    cleaned = "".join(text.split())
    cleaned += "=" * (-len(cleaned) % 4)
    try:
        data = base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImage("the image is not valid base64", parameter=parameter) from None
    if not data:
        raise InvalidImage("the base64 image is empty", parameter=parameter)
    return data


def decode_data_uri(uri: str, *, parameter: str = INPUT_PARAMETER) -> bytes:
    """``data:image/<type>;base64,...`` → bytes.

    The media type must be one of the supported image types
    (``unsupportedImageFormat`` otherwise) and the payload must be base64.
    """
    header, sep, payload = uri.strip().partition(",")
    if not sep:
        raise InvalidImage("a data URI needs a ',' before its data", parameter=parameter)
    meta = header[5:].split(";")
    media_type = meta[0].strip().lower()
    if media_type not in _DATA_URI_MEDIA_TYPES:
        raise UnsupportedImageFormat(
            f"data URI media type {media_type or '(none)'!r} is not an image type we accept "
            f"({', '.join(sorted(set(_DATA_URI_MEDIA_TYPES) - {'image/jpg'}))})",
            parameter=parameter,
        )
    if "base64" not in (m.strip().lower() for m in meta[1:]):
        raise InvalidImage("a data URI image must be base64-encoded", parameter=parameter)
    return decode_base64_image(payload, parameter=parameter)


def encode_data_uri(data: bytes, fmt: str) -> str:
    """Bytes of an encoded image (``fmt`` JPG/PNG/WEBP) as a ``data:`` URI."""
    return f"data:{content_type(fmt)};base64,{base64.b64encode(data).decode()}"


_SNIFFED_MEDIA_TYPES = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
    "GIF": "image/gif",
}


def image_data_uri(data: bytes) -> str | None:
    """Bytes of any supported input image as a ``data:`` URI (media type sniffed from the
    bytes), or ``None`` when they are not PNG, JPEG, WEBP, BMP or GIF."""
    fmt = sniff_format(data)
    if fmt is None:
        return None
    return f"data:{_SNIFFED_MEDIA_TYPES[fmt]};base64,{base64.b64encode(data).decode()}"


def encode_base64(data: bytes) -> str:
    return base64.b64encode(data).decode()
