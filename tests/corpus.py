"""The bad-input corpus (issue 6, R3), generated in memory, and shared test helpers.

Every case is built from scratch by the code below (no fixture files): image bytes for
the CLI and for inline server inputs, URL paths for a small loopback web server, request
field overrides, and manifests. :data:`EXPECTED_CODES` is the table the tests assert,
surface by surface::

    .venv/bin/python -m tests.corpus      # prints the table as Markdown

Helpers used by several test modules:

* :class:`CorpusWeb`: a real HTTP server on a loopback address that serves files,
  answers 404, redirects anywhere and can hang (for fetch timeouts); it records
  every request, so tests can prove a refused target was never contacted.
* :func:`capture_everything` and :func:`assert_no_secrets`: collect every log record
  (root logger at DEBUG) and assert that no secret (API key, presigned signature)
  appears in any line.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import struct
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import cv2
import numpy as np
from PIL import Image

# -- image builders ------------------------------------------------------------------------

#: Size of the generated "good" images (small, so a batch of them runs in milliseconds).
GOOD_W, GOOD_H = 64, 48


def _png(arr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", arr)
    assert ok
    return buf.tobytes()


def _pil_bytes(im: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def shape_image(w: int = GOOD_W, h: int = GOOD_H, box: tuple[int, int, int, int] | None = None):
    """A black ``h×w`` uint8 gray image with one white filled rectangle ``(x0, y0, x1, y1)``.

    The default rectangle sits in the top-left quadrant, so a guide that comes out
    rotated or mirrored has its edges somewhere else.
    """
    arr = np.zeros((h, w), dtype=np.uint8)
    x0, y0, x1, y1 = box or (w // 10, h // 8, w // 2 - 4, h // 2 - 4)
    arr[y0:y1, x0:x1] = 255
    return arr


def good_png(variant: int = 0) -> bytes:
    """A small RGB PNG with a shape (``variant`` moves it, so neighbours differ)."""
    gray = shape_image()
    gray = np.roll(gray, 3 * variant, axis=1)
    return _png(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR))


def empty_file() -> bytes:
    return b""


def truncated_png() -> bytes:
    data = _png(np.random.default_rng(1).integers(0, 255, (96, 128, 3), dtype=np.uint8))
    return data[: len(data) // 2]


def truncated_jpeg() -> bytes:
    rng = np.random.default_rng(2)
    noise = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
    data = _pil_bytes(Image.fromarray(noise), "JPEG", quality=90)
    return data[: len(data) // 2]


def text_named_jpg() -> bytes:
    return b"This is a text file that someone named photo.jpg.\nIt has no pixels.\n"


def svg_image() -> bytes:
    return (
        b'<?xml version="1.0" encoding="UTF-8"?>\n'
        b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="48">'
        b'<rect x="6" y="6" width="24" height="16" fill="white"/></svg>\n'
    )


def animated_gif() -> bytes:
    """Two frames: the rectangle on the left in frame 1, on the right in frame 2."""
    left = shape_image(box=(4, 8, 24, 40))
    right = shape_image(box=(40, 8, 60, 40))
    frames = [Image.fromarray(a).convert("P") for a in (left, right)]
    return _pil_bytes(
        frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0
    )


def png_16bit() -> bytes:
    """A 16-bit-per-channel RGB PNG (values up to 60000)."""
    gray = shape_image().astype(np.uint16) * 235
    return _png(np.dstack([gray, gray // 2, gray]))


def cmyk_jpeg() -> bytes:
    gray = shape_image()
    cmyk = np.dstack([np.zeros_like(gray), np.zeros_like(gray), np.zeros_like(gray), 255 - gray])
    return _pil_bytes(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=95)


def grayscale_png() -> bytes:
    return _pil_bytes(Image.fromarray(shape_image(), "L"), "PNG")


def rgba_png() -> bytes:
    """Transparent *black* background, opaque black rectangle.

    Composited over white (ControlNet's HWC3) this is a black rectangle on white, so
    canny finds its outline; a decoder that dropped the alpha would see all black.
    """
    gray = shape_image()
    rgba = np.zeros((*gray.shape, 4), dtype=np.uint8)
    rgba[:, :, 3] = gray
    return _pil_bytes(Image.fromarray(rgba, "RGBA"), "PNG")


def one_pixel_png() -> bytes:
    return _pil_bytes(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG")


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny, well-formed PNG whose header claims ``width×height`` RGB pixels (30 GB)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def bomb_jpeg(width: int = 65_500, height: int = 65_500) -> bytes:
    """A real small JPEG whose SOF header is patched to claim ``width×height`` pixels.

    JPEG has no fixed-offset size, so this exercises the lazy-open path, not the
    header shortcut the PNG bomb hits.
    """
    data = bytearray(_pil_bytes(Image.new("RGB", (16, 16)), "JPEG"))
    i = 2
    while i < len(data):
        marker, length = data[i + 1], int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            data[i + 5 : i + 9] = struct.pack(">HH", height, width)
            return bytes(data)
        i += 2 + length
    raise AssertionError("no SOF marker")


#: The upright picture the EXIF-rotated JPEG shows: 80 wide, 48 tall, box top-left.
EXIF_UPRIGHT_W, EXIF_UPRIGHT_H = 80, 48


def exif_rotated_jpeg() -> bytes:
    """Pixels stored rotated 90° counter-clockwise, with EXIF Orientation=6 to undo it.

    A viewer (and the engine) must rotate 90° clockwise: the upright picture is
    80×48 (landscape) with its rectangle in the top-left quadrant. Ignoring the tag
    gives a 48×80 portrait; applying it the wrong way puts the rectangle bottom-right.
    """
    upright = shape_image(EXIF_UPRIGHT_W, EXIF_UPRIGHT_H, box=(6, 5, 34, 20))
    stored = np.ascontiguousarray(np.rot90(upright, 1))  # rot90 k=1 is counter-clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    im = Image.fromarray(stored, "L").convert("RGB")
    return _pil_bytes(im, "JPEG", quality=95, exif=exif.tobytes())


# -- the corpus ---------------------------------------------------------------------------

SUCCESS = "success"


@dataclass(frozen=True)
class ImageCase:
    """A file given to ``guideflow preprocess`` and, inline, to ``POST /v1``.

    ``expect`` is the error code (or ``"success"``); on the server the file goes as a
    data URI whose media type follows ``filename`` (what a client that trusts the
    file name sends) and as raw base64 (content sniffing only); ``expect_base64``
    overrides the code for the raw-base64 form when it differs.
    """

    name: str
    filename: str
    build: Callable[[], bytes]
    expect: str
    expect_base64: str | None = None
    note: str = ""


IMAGE_CASES: tuple[ImageCase, ...] = (
    ImageCase(
        "empty_file",
        "empty.png",
        empty_file,
        "invalidImage",
        expect_base64="invalidParameter",
        note="raw base64 of 0 bytes is an empty string: the field itself is missing",
    ),
    ImageCase("truncated_png", "cut.png", truncated_png, "invalidImage"),
    ImageCase("truncated_jpeg", "cut.jpg", truncated_jpeg, "invalidImage"),
    ImageCase("text_named_jpg", "photo.jpg", text_named_jpg, "unsupportedImageFormat"),
    ImageCase("svg", "drawing.svg", svg_image, "unsupportedImageFormat"),
    ImageCase("animated_gif", "anim.gif", animated_gif, SUCCESS, note="first frame"),
    ImageCase("png_16bit", "deep.png", png_16bit, SUCCESS),
    ImageCase("cmyk_jpeg", "cmyk.jpg", cmyk_jpeg, SUCCESS),
    ImageCase("grayscale_png", "gray.png", grayscale_png, SUCCESS),
    ImageCase("rgba_png", "alpha.png", rgba_png, SUCCESS, note="composited over white"),
    ImageCase("one_pixel", "dot.png", one_pixel_png, SUCCESS, note="a 1×1 guide"),
    ImageCase("bomb_png_100000x100000", "bomb.png", bomb_png, "imageTooLarge"),
    ImageCase("bomb_jpeg_65500x65500", "bomb.jpg", bomb_jpeg, "imageTooLarge"),
    ImageCase("exif_rotated_jpeg", "rotated.jpg", exif_rotated_jpeg, SUCCESS, note="upright"),
)

_MEDIA_TYPES = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "gif": "image/gif",
    "svg": "image/svg+xml",
}


def data_uri(data: bytes, filename: str) -> str:
    """``data:<media type of the file name>;base64,...``."""
    media = _MEDIA_TYPES[filename.rpartition(".")[2]]
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass(frozen=True)
class RefCase:
    """An image reference string sent to the server (no CLI equivalent)."""

    name: str
    ref: str
    expect: str


REF_CASES: tuple[RefCase, ...] = (
    RefCase("invalid_base64", "iVBORw0KGgo***not base64***", "invalidImage"),
    RefCase(
        "data_uri_text_plain",
        "data:text/plain;base64," + b64(b"hello, I am text"),
        "unsupportedImageFormat",
    ),
)


@dataclass(frozen=True)
class UrlCase:
    """An input URL; ``path`` is served by :class:`CorpusWeb` unless ``url`` is absolute."""

    name: str
    path: str
    expect: str


#: The private address the redirect case points at (never contacted: the guard refuses it).
PRIVATE_TARGET = "http://10.255.0.1/secret.png"

URL_CASES: tuple[UrlCase, ...] = (
    UrlCase("url_404", "/missing.png", "imageDownloadFailed"),
    UrlCase("url_timeout", "/hang.png", "imageDownloadFailed"),
    UrlCase("url_redirect_to_private", "/to-private", "forbiddenURL"),
    UrlCase("url_ftp", "ftp://files.example.com/photo.png", "unsupportedURLScheme"),
)


@dataclass(frozen=True)
class ParamCase:
    """A bad request parameter: task fields for the server, options for the CLI."""

    name: str
    fields: dict[str, Any]
    cli_args: tuple[str, ...] | None
    expect: str
    parameter: str


PARAM_CASES: tuple[ParamCase, ...] = (
    ParamCase(
        "unknown_preprocessor",
        {"model": "runware:controlnet-preprocess@sharpen"},
        ("--type", "sharpen"),
        "invalidPreProcessorType",
        "model",
    ),
    ParamCase(
        "canny_low_above_high",
        {"settings": {"lowThresholdCanny": 200, "highThresholdCanny": 100}},
        ("--low", "200", "--high", "100"),
        "invalidParameter",
        "lowThresholdCanny",
    ),
    ParamCase(
        "canny_low_equals_high",
        {"settings": {"lowThresholdCanny": 150, "highThresholdCanny": 150}},
        ("--low", "150", "--high", "150"),
        "invalidParameter",
        "lowThresholdCanny",
    ),
    ParamCase("width_zero", {"width": 0}, ("--width", "0"), "invalidParameter", "width"),
    ParamCase("width_negative", {"width": -64}, ("--width", "-64"), "invalidParameter", "width"),
    ParamCase(
        "output_quality_5",
        {"outputQuality": 5, "outputFormat": "JPG"},
        ("--quality", "5", "--format", "JPG"),
        "invalidParameter",
        "outputQuality",
    ),
    ParamCase("task_uuid_not_a_uuid", {"taskUUID": "task-1"}, None, "invalidTaskUUID", "taskUUID"),
    ParamCase(
        "task_uuid_duplicate_in_batch",
        {"taskUUID": "<same as the first task>"},
        None,
        "conflictTaskUUID",
        "taskUUID",
    ),
)


@dataclass(frozen=True)
class ManifestCase:
    """A manifest (its text) and what the pipeline must make of it.

    ``expect`` is the plan-time error code, or ``None`` when the manifest plans and
    ``rows`` gives each data row's outcome (``"success"`` = work items, else the code).
    """

    name: str
    filename: str
    content: bytes
    expect: str | None
    rows: tuple[str, ...] = ()
    error_parameters: tuple[str | None, ...] = ()


MANIFEST_CASES: tuple[ManifestCase, ...] = (
    ManifestCase(
        "manifest_missing_image_column",
        "no_image.csv",
        b"id,url\na,https://example.com/a.png\n",
        "invalidManifest",
    ),
    ManifestCase(
        "manifest_not_csv",
        "binary.csv",
        bytes(range(256)) * 4,
        "invalidManifest",
    ),
    ManifestCase(
        "manifest_extra_columns_ignored",
        "extra.csv",
        b"id,image,photographer,licence\n"
        b"a,https://example.com/a.png,Ann,CC-BY\n"
        b"b,https://example.com/b.png,Bob,CC0\n",
        None,
        rows=("success", "success"),
        error_parameters=(None, None),
    ),
    ManifestCase(
        "manifest_row_missing_value",
        "gaps.csv",
        b"id,image,width\n"
        b"a,https://example.com/a.png,256\n"
        b"b,,256\n"
        b"c,https://example.com/c.png,256\n",
        None,
        rows=("success", "invalidParameter", "success"),
        error_parameters=(None, "image", None),
    ),
    ManifestCase(
        "manifest_row_missing_and_extra_fields",
        "ragged.csv",
        b"id,image,width\n"
        b"a,https://example.com/a.png,256\n"
        b"b,https://example.com/b.png\n"
        b"c,https://example.com/c.png,256,surplus\n"
        b"d,https://example.com/d.png,256\n",
        None,
        rows=("success", "invalidParameter", "invalidParameter", "success"),
        error_parameters=(None, None, None, None),
    ),
)


def _code(expect: str | None, rows: tuple[str, ...]) -> str:
    return expect if expect is not None else " / ".join(rows)


#: case name → {surface: expected code}; surfaces: ``cli``, ``server``, ``server_base64``,
#: ``pipeline``. The tests assert every entry.
EXPECTED_CODES: dict[str, dict[str, str]] = {
    **{
        c.name: {"cli": c.expect, "server": c.expect, "server_base64": c.expect_base64 or c.expect}
        for c in IMAGE_CASES
    },
    **{c.name: {"server": c.expect} for c in REF_CASES},
    **{c.name: {"server": c.expect} for c in URL_CASES},
    **{
        c.name: ({"cli": c.expect} if c.cli_args else {}) | {"server": c.expect}
        for c in PARAM_CASES
    },
    **{c.name: {"pipeline": _code(c.expect, c.rows)} for c in MANIFEST_CASES},
}


def markdown_table(codes: dict[str, dict[str, str]] = EXPECTED_CODES) -> str:
    """The code table as Markdown (for the closing note)."""
    surfaces = ("cli", "server", "server_base64", "pipeline")
    lines = ["| case | " + " | ".join(surfaces) + " |", "|---" * (len(surfaces) + 1) + "|"]
    for name, by_surface in codes.items():
        cells = [by_surface.get(s, "–") for s in surfaces]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- a loopback web server for URL cases -----------------------------------------------------


@dataclass
class Hit:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class CorpusWeb:
    """A real HTTP server on ``host`` (a loopback address) for input/upload/webhook URLs.

    ``files[path] = (bytes, content type)`` are served by GET; ``redirects[path] =
    location`` answer 302; any path starting with ``/hang`` holds the connection open
    without answering until the server stops; anything else is 404 (PUT/POST: 200).
    Every request is recorded in ``hits`` *before* it is answered.
    """

    host: str = "127.0.0.1"
    files: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    redirects: dict[str, str] = field(default_factory=dict)
    hits: list[Hit] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        web = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(
                self, status: int, body: bytes = b"", headers: dict[str, str] | None = None
            ) -> None:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if body and self.command != "HEAD":
                    self.wfile.write(body)

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                path = self.path.partition("?")[0]
                with web._lock:
                    web.hits.append(Hit(self.command, self.path, dict(self.headers.items())))
                if path.startswith("/hang"):
                    web._stop.wait(60)
                    return
                if path in web.redirects:
                    self._answer(302, headers={"Location": web.redirects[path]})
                elif self.command in ("PUT", "POST"):
                    self._answer(200)
                elif path in web.files:
                    data, ctype = web.files[path]
                    self._answer(200, data, {"Content-Type": ctype})
                else:
                    self._answer(404)

            do_GET = do_PUT = do_POST = do_HEAD = _handle

        self.server = ThreadingHTTPServer((self.host, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{self.host}:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> CorpusWeb:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()

    def paths(self) -> list[str]:
        with self._lock:
            return [h.path for h in self.hits]


# -- secrets ------------------------------------------------------------------------------


class _ListHandler(logging.Handler):
    def __init__(self, exclude: tuple[str, ...] = ()) -> None:
        super().__init__(logging.DEBUG)
        self.exclude = exclude
        self.records: list[logging.LogRecord] = []
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if any(record.name == n or record.name.startswith(n + ".") for n in self.exclude):
            return
        self.records.append(record)
        # format now (message, args, exception and stack text): what a real handler writes
        self.lines.append(self.format(record))


@contextlib.contextmanager
def capture_everything(exclude: tuple[str, ...] = ()) -> Iterator[list[str]]:
    """Collect every log record of every logger, at DEBUG, as formatted lines.

    The root logger and every already-created logger are set to DEBUG for the
    duration (levels and ``disabled`` flags are restored afterwards), so nothing a
    real DEBUG-level deployment would write is missed. Records of loggers named in
    ``exclude`` (and their children) are dropped: for stand-ins of *third-party*
    services running in this process (moto's S3 logs the URLs it is sent, as AWS
    would on its side). Yields the growing list of lines.
    """
    handler = _ListHandler(exclude)
    root = logging.getLogger()
    existing = root.manager.loggerDict.values()
    loggers = [root, *(lg for lg in existing if isinstance(lg, logging.Logger))]
    saved = [(lg, lg.level, lg.disabled) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
        lg.disabled = False
    root.addHandler(handler)
    try:
        yield handler.lines
    finally:
        root.removeHandler(handler)
        for lg, level, disabled in saved:
            lg.setLevel(level)
            lg.disabled = disabled


def _shown(secret: str) -> str:
    """A secret as failure messages may show it: its first 4 characters only."""
    return secret[:4] + "…" if len(secret) > 4 else "…"


def assert_no_secrets(texts: Iterable[str], secrets: Iterable[str]) -> int:
    """Assert that no secret occurs in any line of ``texts``; return the lines checked.

    ``texts`` are log lines, captured stdout/stderr, exception messages, response
    bodies... (each may hold several lines). The comparison is exact and
    case-sensitive; URL-encoded forms of each secret are checked too. The failure
    message names the offending line with the secret itself elided.
    """
    from urllib.parse import quote

    needles: list[tuple[str, str]] = []
    for secret in secrets:
        if not secret:
            raise ValueError("an empty secret matches everything")
        for form in dict.fromkeys((secret, quote(secret, safe=""))):
            needles.append((form, secret))
    checked = 0
    for text in texts:
        lines = str(text).splitlines() or [""]
        for line in lines:
            checked += 1
            for form, secret in needles:
                if form in line:
                    shown = line.replace(form, "<SECRET>")[:300]
                    head = lines[0].replace(form, "<SECRET>")[:120]
                    raise AssertionError(
                        f"secret {_shown(secret)!r} appears in: {shown!r} "
                        f"(of a text starting {head!r})"
                    )
    return checked


if __name__ == "__main__":  # pragma: no cover - a convenience for the closing note
    print(markdown_table())
