"""Read image manifests (CSV, Parquet, JSONL, plain text) in independent, seekable shards.

A manifest lists the images a pipeline run should process, one row per image. This module
plans a manifest into :class:`ShardSpec` s in one streaming pass and reads any shard on its
own (in another process or on another machine), touching only that shard's bytes.

Formats and detection
    ``format=`` on :class:`ManifestSpec` wins; otherwise the extension decides, after a
    compression suffix is removed: ``.csv`` → CSV, ``.parquet``/``.pq`` → Parquet,
    ``.jsonl``/``.ndjson`` → JSONL, anything else (``.txt``, ``.lst``, none) → text (one URI
    a line). Accepted ``format`` spellings: ``csv``, ``parquet``/``pq``, ``jsonl``/``ndjson``,
    ``text``/``txt``/``lst``; the planned shards carry the canonical name.
Compression
    By extension only (``.gz``, ``.bz2``, ``.xz``, ``.zst``/``.zstd``), for the line formats
    only (Parquet compresses internally; a ``.parquet.gz`` is an invalid manifest). A codec
    fsspec cannot load (``zstd`` needs the ``zstandard`` package) is an invalid manifest with
    that hint. Byte offsets of a compressed manifest count *decompressed* bytes, so a shard
    of a compressed manifest decompresses (and discards) everything before its range: for big
    manifests prefer uncompressed text or Parquet, or large shards.
Storage
    Everything goes through fsspec (``connectors.storage.url_to_fs(url, **storage_options)``, which
    adds the S3 endpoint from ``GUIDEFLOW_S3_ENDPOINT``), so any protocol fsspec knows works:
    plain paths, ``file://``, ``memory://``, ``s3://``, ``gs://``.
    A shard of an uncompressed line manifest is read with ranged ``cat_file`` calls of at most
    :data:`READ_BLOCK_SIZE` bytes, i.e. only its own byte range (planning reads sequentially
    in :data:`BLOCK_SIZE` pieces). ``storage_options`` travel inside
    every :class:`ShardSpec` (and its ``to_dict``): prefer ambient credentials (environment,
    instance roles) over secrets in ``storage_options``.
Line records (CSV, JSONL, text)
    Lines end at ``\\n`` (a preceding ``\\r`` is whitespace; bare-``\\r`` files are not
    supported). Blank (whitespace-only) lines are skipped everywhere and are not rows; in text
    manifests lines whose first non-blank character is ``#`` are comments and are not rows
    either. Row numbers count data rows only (0-based, header excluded). A CSV record ends at
    the first newline at which it holds an even number of ``"`` characters, so quoted fields
    may contain newlines, commas and doubled quotes. A record longer than
    :data:`MAX_RECORD_BYTES` (usually an unbalanced quote) makes the manifest invalid; this is
    what keeps planning and reading in bounded memory.
CSV
    Comma-separated, ``"`` quoting, UTF-8 (a BOM is dropped), first non-blank record is the
    header. Header names are stripped of whitespace and matched case-sensitively. Each record
    is parsed with :mod:`csv` (strict mode); a record that does not parse, or whose field count
    differs from the header's, becomes an error row. Duplicate header names among the columns
    we use, or a missing image column, make the manifest invalid.
JSONL
    One JSON object a line (keys stripped of whitespace). Planning checks that the first data
    line is a JSON object (catches a CSV or binary file named ``.jsonl``); later lines that are
    not valid JSON objects become error rows.
Text
    The stripped line is the image URI; there are no other columns.
Parquet
    Planning reads only the footer: shards are ``shard_size`` rows each, independent of row
    groups. A shard reads (only the used columns of) the row groups that overlap its rows, so
    a one-row shard still decodes a whole row group. The image column must be string-typed.
Columns and values
    Used columns: the image column (``image_column``, default ``image``), the id column
    (``id_column``, default ``id``), ``preprocessor``, ``settings`` (a JSON object) and the
    protocol's top-level settings ``width``, ``height``, ``lowThresholdCanny``,
    ``highThresholdCanny`` (integers) and ``includeHandsAndFaceOpenPose`` (boolean). Any other
    column is ignored. Text values (every CSV cell; strings in JSONL/Parquet) are stripped,
    ``""`` means absent; integers accept ``"512"`` and integral ``"512.0"`` (what pandas writes
    for an integer column with gaps), booleans accept true/false/1/0/yes/no in any case.
    Native JSON/Parquet values keep their types but are checked the same way (``bool`` is not
    an integer; NaN means absent; an integral float is an integer). Range checks (e.g. width
    1..16384) are left to the protocol model, which is the one place that knows them.
    ``ManifestRow.settings`` holds the known columns that are present plus the keys of the
    ``settings`` object; a key given both ways is an error, as in the protocol.
Row ids
    The id column's value (stringified, stripped) when present and non-empty, otherwise the
    first 16 hex digits of ``sha256(uri)`` of the stripped URI, so the same URI always gets
    the same id (a presigned URL whose signature changes gets a new id each time: give such
    manifests an id column). A row without a URI and without an id gets ``row-<n>``.
Errors
    A bad row never raises: it is yielded with ``error`` set to an :class:`InvalidParameter`
    naming the column (``image``, ``width``, ``settings.x``...). A manifest that cannot be
    used at all raises :class:`ManifestError` (code ``invalidManifest``) when planning starts
    or reaches the bad spot: missing file, NUL bytes or invalid UTF-8 in a line manifest, no
    CSV header, missing image column, a Parquet file that does not open. A shard whose bytes
    no longer hold the planned number of rows (the manifest changed after planning) raises
    :class:`ManifestError` as well. Other I/O errors (network, permissions) propagate so that
    orchestrators can retry them.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import fsspec
import fsspec.compression
import numpy as np

from connectors.storage import url_to_fs
from guideflow.errors import GuideflowError, InvalidParameter

__all__ = [
    "BLOCK_SIZE",
    "BOOL_FIELDS",
    "INT_FIELDS",
    "MAX_RECORD_BYTES",
    "READ_BLOCK_SIZE",
    "ManifestError",
    "ManifestRow",
    "ManifestSpec",
    "ShardSpec",
    "detect_format",
    "plan_shards",
    "read_shard",
]

BLOCK_SIZE = 2 << 20
"""Bytes read per call while planning a line manifest (2 MiB; planning holds about 5x this)."""

READ_BLOCK_SIZE = 1 << 20
"""Bytes read per call while reading a shard (1 MiB: bounds the parsed rows held at once)."""

MAX_RECORD_BYTES = 16 << 20
"""Longest accepted record (line, or multi-line CSV record); room for inline data URIs."""

INT_FIELDS = ("width", "height", "lowThresholdCanny", "highThresholdCanny")
BOOL_FIELDS = ("includeHandsAndFaceOpenPose",)
PREPROCESSOR_COLUMN = "preprocessor"
SETTINGS_COLUMN = "settings"

_FORMATS = {
    "csv": "csv",
    "parquet": "parquet",
    "pq": "parquet",
    "jsonl": "jsonl",
    "ndjson": "jsonl",
    "text": "text",
    "txt": "text",
    "lst": "text",
}
_COMPRESSIONS = {
    "gz": "gzip",
    "gzip": "gzip",
    "bz2": "bz2",
    "xz": "xz",
    "lzma": "lzma",
    "zst": "zstd",
    "zstd": "zstd",
}
_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})
_INT_TEXT = re.compile(r"[+-]?\d+(?:\.0*)?")
_WS = rb"[ \t\r\x0b\x0c]*"
_BLANK_LINE = re.compile(rb"\n" + _WS + rb"\n")
_BLANK_OR_COMMENT_LINE = re.compile(rb"\n" + _WS + rb"[\n#]")
_STRING_TYPES = ("string", "large_string", "string_view", "null")

# Inline data URIs can exceed csv's default 128 KiB field limit; records are capped anyway.
if csv.field_size_limit() < MAX_RECORD_BYTES:
    csv.field_size_limit(MAX_RECORD_BYTES)


class ManifestError(GuideflowError):
    """The manifest as a whole cannot be used (wrong format, no image column, unreadable)."""

    code = "invalidManifest"
    http_status = 400


@dataclass(frozen=True)
class ManifestSpec:
    """Where a manifest is and how to read it. Picklable; ``storage_options`` go to fsspec."""

    url: str
    format: str | None = None
    image_column: str = "image"
    id_column: str = "id"
    storage_options: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        # A private plain dict: picklable, JSON-able, and immune to the caller's later edits.
        object.__setattr__(self, "storage_options", dict(self.storage_options))

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "format": self.format,
            "image_column": self.image_column,
            "id_column": self.id_column,
            "storage_options": dict(self.storage_options),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ManifestSpec:
        return cls(
            url=data["url"],
            format=data.get("format"),
            image_column=data.get("image_column", "image"),
            id_column=data.get("id_column", "id"),
            storage_options=data.get("storage_options") or {},
        )


@dataclass(frozen=True)
class ShardSpec:
    """Rows ``[row_start, row_stop)`` of a manifest, found at ``[byte_start, byte_stop)``.

    Byte offsets are set for line formats (decompressed offsets for compressed files) and
    ``None`` for Parquet. ``columns`` is the CSV header captured at plan time (so a shard
    need not read the header again); it is empty for other formats, and a CSV shard built
    without it reads the header itself.
    """

    manifest: ManifestSpec
    index: int
    row_start: int
    row_stop: int
    byte_start: int | None
    byte_stop: int | None
    columns: tuple[str, ...] = ()

    @property
    def num_rows(self) -> int:
        return self.row_stop - self.row_start

    def to_dict(self) -> dict[str, Any]:
        return {
            "manifest": self.manifest.to_dict(),
            "index": self.index,
            "row_start": self.row_start,
            "row_stop": self.row_stop,
            "byte_start": self.byte_start,
            "byte_stop": self.byte_stop,
            "columns": list(self.columns),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShardSpec:
        return cls(
            manifest=ManifestSpec.from_dict(data["manifest"]),
            index=int(data["index"]),
            row_start=int(data["row_start"]),
            row_stop=int(data["row_stop"]),
            byte_start=None if data.get("byte_start") is None else int(data["byte_start"]),
            byte_stop=None if data.get("byte_stop") is None else int(data["byte_stop"]),
            columns=tuple(data.get("columns") or ()),
        )


@dataclass(slots=True)
class ManifestRow:
    """One manifest row: the image URI, its id, optional preprocessor and per-row settings.

    ``error`` is set (and the row should be recorded as failed, not processed) when the row
    itself is unusable; the other fields then hold whatever could be parsed.
    """

    row: int
    image: str | None
    id: str
    preprocessor: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    error: GuideflowError | None = None


# -- format and location -------------------------------------------------------------------


def _url_path(url: str) -> str:
    """The location part of a URL (host/bucket included) or plain path, without query string."""
    if "://" not in url:
        return url
    return url.split("://", 1)[1].split("?", 1)[0]


def _display(url: str) -> str:
    """The URL for messages: no userinfo, no query string (it may carry a signature)."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.hostname or "", parts.path, "", ""))


def _split_compression(url: str) -> tuple[str, str | None]:
    """(path without compression suffix, fsspec compression name or None)."""
    path = _url_path(url)
    stem, dot, ext = path.rpartition(".")
    if dot and "/" not in ext and ext.lower() in _COMPRESSIONS:
        return stem, _COMPRESSIONS[ext.lower()]
    return path, None


def detect_format(spec: ManifestSpec) -> tuple[str, str | None]:
    """The canonical format and compression of a manifest; raises ManifestError if unusable."""
    stem, compression = _split_compression(spec.url)
    if spec.format is not None:
        fmt = _FORMATS.get(spec.format.strip().lower())
        if fmt is None:
            raise ManifestError(
                f"unknown manifest format {spec.format!r}; use csv, parquet, jsonl or text",
                parameter="format",
            )
    else:
        name = stem.rpartition("/")[2]
        ext = name.rpartition(".")[2].lower() if "." in name else ""
        fmt = _FORMATS.get(ext, "text")
    if compression is not None:
        if fmt == "parquet":
            raise ManifestError(
                f"{_display(spec.url)}: Parquet manifests cannot be compressed as a whole "
                "(Parquet compresses its columns itself)"
            )
        if compression not in fsspec.compression.compr:
            raise ManifestError(
                f"{_display(spec.url)}: fsspec cannot decompress {compression!r} here "
                "(for .zst install the 'zstandard' package)"
            )
    return fmt, compression


def _fs_path(spec: ManifestSpec) -> tuple[Any, str]:
    # connectors.storage.url_to_fs: the same S3 endpoint (GUIDEFLOW_S3_ENDPOINT...) as outputs
    # and ledger, so a manifest in MinIO/R2 needs no storage_options of its own.
    fs, path = url_to_fs(spec.url, **spec.storage_options)
    return fs, path


def _open_raw(spec: ManifestSpec) -> Any:
    """Open the manifest's bytes as stored (seekable fsspec file)."""
    fs, path = _fs_path(spec)
    try:
        # block_size also caps the read-ahead of object-store files (s3fs defaults to 50 MiB)
        return fs.open(path, "rb", block_size=BLOCK_SIZE)
    except FileNotFoundError as exc:
        raise ManifestError(f"manifest not found: {_display(spec.url)}") from exc


@contextmanager
def _open(spec: ManifestSpec, compression: str | None) -> Iterator[Any]:
    """Open the manifest for sequential binary reading, decompressing if needed."""
    with _open_raw(spec) as raw:
        if compression is None:
            yield raw
            return
        with fsspec.compression.compr[compression](raw, mode="rb") as stream:
            yield stream


# -- value parsing ---------------------------------------------------------------------------


class _BadValue(ValueError):
    """A cell that cannot be converted; the message says why."""


def _absent(value: Any) -> bool:
    """None, NaN (pandas' missing value) and blank text all mean "not given"."""
    if value is None:
        return True
    if value.__class__ is str:
        return not value.strip()
    return isinstance(value, float) and math.isnan(value)


def _to_text(value: Any) -> str | None:
    if value.__class__ is str:  # the common case (every CSV cell) first
        return value.strip() or None
    if _absent(value):
        return None
    raise _BadValue(f"expected a string, got {type(value).__name__}")


def _to_int(value: Any) -> int | None:
    if value.__class__ is str:
        text = value.strip()
        if text.isdigit():
            return int(text)
        if not text:
            return None
        if _INT_TEXT.fullmatch(text):
            return int(text.partition(".")[0])
        raise _BadValue(f"expected an integer, got {text!r}")
    if _absent(value):
        return None
    if isinstance(value, bool | np.bool_):
        raise _BadValue(f"expected an integer, got {value!r}")
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return int(value)
    raise _BadValue(f"expected an integer, got {value!r}")


def _to_bool(value: Any) -> bool | None:
    if value.__class__ is str:
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        if not text:
            return None
        raise _BadValue(f"expected true/false/1/0/yes/no, got {text!r}")
    if _absent(value):
        return None
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer) and int(value) in (0, 1):
        return bool(value)
    raise _BadValue(f"expected true/false/1/0/yes/no, got {value!r}")


def _to_settings(value: Any) -> dict[str, Any] | None:
    if _absent(value):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise _BadValue(f"not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise _BadValue(f"expected a JSON object, got {type(value).__name__}")
    return value


def _row_id(explicit: Any, uri: str | None, row: int) -> str:
    """The id column's value, else sha256(uri)[:16], else ``row-<n>``."""
    if explicit is not None and not _absent(explicit):
        return str(explicit).strip()
    if uri:
        return hashlib.sha256(uri.encode("utf-8")).hexdigest()[:16]
    return f"row-{row}"


_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    **dict.fromkeys(INT_FIELDS, _to_int),
    **dict.fromkeys(BOOL_FIELDS, _to_bool),
}


def _make_row(row: int, values: Mapping[str, Any], image_column: str) -> ManifestRow:
    """Build a ManifestRow from role-keyed raw values; the first problem becomes its error.

    Hot path (runs once per manifest row): no closures, str fast paths in the converters.
    """
    if "@record" in values:  # the record itself is broken: nothing in it can be trusted
        error = InvalidParameter(f"row {row}: {values['@record']}", parameter=None)
        return ManifestRow(row=row, image=None, id=f"row-{row}", error=error)
    problem: tuple[str, str] | None = None  # (column, message) of the first problem
    image = preprocessor = None
    settings: dict[str, Any] = {}
    extra: dict[str, Any] | None = None
    for role, value in values.items():
        try:
            if role == "image":
                image = _to_text(value)
            elif role == PREPROCESSOR_COLUMN:
                preprocessor = _to_text(value)
            elif role == SETTINGS_COLUMN:
                extra = _to_settings(value)
            elif role != "id":
                parsed = _CONVERTERS[role](value)
                if parsed is not None:
                    settings[role] = parsed
        except _BadValue as exc:
            column = image_column if role == "image" else role
            problem = problem or (column, f"{column}: {exc}")
    if image is None:
        problem = problem or (image_column, f"missing image URI (column {image_column!r})")
    if extra:
        for key, value in extra.items():
            if key in settings:
                message = f"{key!r} is given both as a column and in settings"
                problem = problem or (f"settings.{key}", message)
            else:
                settings[key] = value
    error = None
    if problem is not None:
        error = InvalidParameter(f"row {row}: {problem[1]}", parameter=problem[0])
    return ManifestRow(
        row=row,
        image=image,
        id=_row_id(values.get("id"), image, row),
        preprocessor=preprocessor,
        settings=settings,
        error=error,
    )


def _roles(spec: ManifestSpec) -> dict[str, str]:
    """Column name → role key used by :func:`_make_row` (image and id get fixed keys)."""
    roles = {name: name for name in (*INT_FIELDS, *BOOL_FIELDS)}
    roles[PREPROCESSOR_COLUMN] = PREPROCESSOR_COLUMN
    roles[SETTINGS_COLUMN] = SETTINGS_COLUMN
    roles[spec.id_column.strip()] = "id"
    roles[spec.image_column.strip()] = "image"
    return roles


# -- line scanning -----------------------------------------------------------------------------


class _Assembler:
    """Turns lines (without their ``\\n``) into data records under the rules in the docstring.

    ``feed`` returns the finished record, or None while a record is open or the line is blank
    or a comment. With ``keep=False`` (planning) it returns the last line instead of joining
    the parts, so only the fact that a record ended matters.
    """

    __slots__ = ("is_csv", "is_text", "keep", "open", "parts", "pending")

    def __init__(self, fmt: str, *, keep: bool) -> None:
        self.is_csv = fmt == "csv"
        self.is_text = fmt == "text"
        self.keep = keep
        self.open = False
        self.parts: list[bytes] = []
        self.pending = 0

    def feed(self, line: bytes) -> bytes | None:
        if self.open:
            self.pending += len(line) + 1
            if self.pending > MAX_RECORD_BYTES:
                raise ManifestError(
                    f"a CSV record is longer than {MAX_RECORD_BYTES} bytes (is a quote left open?)"
                )
            if self.keep:
                self.parts.append(line)
            if line.count(b'"') & 1:
                return self._close()
            return None
        stripped = line.strip()
        if not stripped:
            return None
        if self.is_csv:
            if line.count(b'"') & 1:
                self.open = True
                self.pending = len(line) + 1
                self.parts = [line] if self.keep else []
                return None
            return line
        if self.is_text and stripped[:1] == b"#":
            return None
        return stripped

    def finish(self) -> bytes | None:
        """At end of input: an open CSV record ends there (and will fail to parse)."""
        return self._close() if self.open else None

    def _close(self) -> bytes:
        self.open = False
        record = b"\n".join(self.parts) if self.keep else b""
        self.parts = []
        return record


def _blocks(
    stream: Any, *, limit: int | None = None, block_size: int | None = None
) -> Iterator[bytes]:
    """Read ``stream`` in ``block_size`` (default BLOCK_SIZE) pieces, ``limit`` bytes at most."""
    block_size = block_size or BLOCK_SIZE
    remaining = limit
    while remaining is None or remaining > 0:
        size = block_size if remaining is None else min(block_size, remaining)
        block = stream.read(size)
        if not block:
            return
        if remaining is not None:
            remaining -= len(block)
        yield block


def _validated(blocks: Iterable[bytes], url: str) -> Iterator[bytes]:
    """Pass blocks through, raising ManifestError on NUL bytes or invalid UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    for block in blocks:
        if b"\x00" in block:
            where = offset + block.index(b"\x00")
            raise ManifestError(
                f"{_display(url)}: NUL byte at offset {where}; this is not a text manifest"
            )
        if not (block.isascii() and decoder.getstate()[0] == b""):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                raise ManifestError(
                    f"{_display(url)}: invalid UTF-8 at offset {offset + exc.start}"
                ) from None
        offset += len(block)
        yield block
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ManifestError(f"{_display(url)}: truncated UTF-8 character at the end") from None


def _regions(blocks: Iterable[bytes], base: int) -> Iterator[tuple[bytes, int, bool]]:
    """Yield (bytes, absolute offset, complete) pieces that end at a newline.

    ``complete`` is False only for a final piece without a trailing newline.
    """
    carry = b""
    offset = base
    for block in blocks:
        data = carry + block if carry else block
        cut = data.rfind(b"\n")
        if cut < 0:
            carry = data
            if len(carry) > MAX_RECORD_BYTES:
                raise ManifestError(f"a line longer than {MAX_RECORD_BYTES} bytes at {offset}")
            continue
        region = data[: cut + 1]
        carry = data[cut + 1 :]
        yield region, offset, True
        offset += len(region)
    if carry:
        yield carry, offset, False


def _lines(region: bytes, complete: bool) -> list[bytes]:
    lines = region.split(b"\n")
    if complete:
        lines.pop()  # the empty piece after the final newline
    return lines


def _fast_region(region: bytes, fmt: str, asm: _Assembler) -> bool:
    """True when every line of ``region`` is exactly one data record (no scanning needed)."""
    if asm.open:
        return False
    if fmt == "csv" and b'"' in region:
        return False
    first = region[: region.find(b"\n") + 1].strip()
    if not first or (fmt == "text" and first[:1] == b"#"):
        return False
    pattern = _BLANK_OR_COMMENT_LINE if fmt == "text" else _BLANK_LINE
    return pattern.search(region) is None


# -- planning --------------------------------------------------------------------------------


def plan_shards(spec: ManifestSpec, shard_size: int = 1000) -> Iterator[ShardSpec]:
    """Split a manifest into shards of ``shard_size`` data rows, streaming, in one pass.

    Memory stays bounded (one block plus one record for line formats; the footer for
    Parquet). Raises :class:`ManifestError` when the manifest is unusable.
    """
    if shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    fmt, compression = detect_format(spec)
    resolved = replace(spec, format=fmt)
    if fmt == "parquet":
        yield from _plan_parquet(resolved, shard_size)
    else:
        yield from _plan_lines(resolved, fmt, compression, shard_size)


class _ShardCutter:
    """Collects row-end offsets and emits a ShardSpec every ``shard_size`` rows."""

    def __init__(self, spec: ManifestSpec, shard_size: int, start: int, columns: tuple[str, ...]):
        self.spec = spec
        self.size = shard_size
        self.columns = columns
        self.index = 0
        self.row_start = 0
        self.count = 0
        self.byte_start = start
        self.last_end = start

    def _emit(self, count: int, stop: int) -> ShardSpec:
        shard = ShardSpec(
            manifest=self.spec,
            index=self.index,
            row_start=self.row_start,
            row_stop=self.row_start + count,
            byte_start=self.byte_start,
            byte_stop=stop,
            columns=self.columns,
        )
        self.index += 1
        self.row_start += count
        self.byte_start = stop
        self.count = 0
        return shard

    def add(self, ends: Any) -> Iterator[ShardSpec]:
        """Take a sorted sequence of absolute row-end offsets."""
        n = len(ends)
        if n == 0:
            return
        i = 0
        while n - i >= self.size - self.count:
            i += self.size - self.count
            yield self._emit(self.size, int(ends[i - 1]))
        self.count += n - i
        self.last_end = int(ends[-1])

    def finish(self) -> Iterator[ShardSpec]:
        if self.count:
            yield self._emit(self.count, self.last_end)


def _plan_lines(
    spec: ManifestSpec, fmt: str, compression: str | None, shard_size: int
) -> Iterator[ShardSpec]:
    has_first = fmt in ("csv", "jsonl")  # a CSV header / first JSON line is checked first
    asm = _Assembler(fmt, keep=has_first)
    cutter = None if has_first else _ShardCutter(spec, shard_size, 0, ())
    position = 0
    with _open(spec, compression) as stream:
        for region, base, complete in _regions(_validated(_blocks(stream), spec.url), 0):
            position = base + len(region)
            if cutter is not None and complete and _fast_region(region, fmt, asm):
                ends = np.flatnonzero(np.frombuffer(region, dtype=np.uint8) == 10)
                ends += base + 1
                yield from cutter.add(ends)
                continue
            ends_list: list[int] = []
            offset = base
            for line in _lines(region, complete):
                offset += len(line) + 1
                record = asm.feed(line)
                if record is None:
                    continue
                end = min(offset, position)
                if cutter is None:
                    columns = _check_first_record(spec, fmt, record)
                    asm.keep = False
                    cutter = _ShardCutter(spec, shard_size, end if fmt == "csv" else 0, columns)
                    if fmt == "csv":
                        continue  # the header is not a row
                ends_list.append(end)
            if cutter is not None:
                yield from cutter.add(ends_list)
    tail = asm.finish()
    if cutter is None:
        if tail is not None:
            _check_first_record(spec, fmt, tail)
        if fmt == "csv":
            raise ManifestError(f"{_display(spec.url)}: no CSV header (empty or unbalanced quote)")
        return
    if tail is not None:
        yield from cutter.add([position])
    yield from cutter.finish()


def _parse_header(spec: ManifestSpec, record: bytes) -> tuple[str, ...]:
    """Parse and check a CSV header record; returns the stripped column names."""
    try:
        text = record.decode("utf-8").removeprefix("\ufeff")
        rows = list(csv.reader([text], strict=True))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ManifestError(f"{_display(spec.url)}: unreadable CSV header ({exc})") from None
    if len(rows) != 1:
        raise ManifestError(f"{_display(spec.url)}: unreadable CSV header")
    columns = tuple(name.strip() for name in rows[0])
    roles = _roles(spec)
    used = [name for name in columns if name in roles]
    duplicates = sorted({name for name in used if used.count(name) > 1})
    if duplicates:
        raise ManifestError(
            f"{_display(spec.url)}: duplicate CSV columns {duplicates}", parameter=duplicates[0]
        )
    image_column = spec.image_column.strip()
    if image_column not in columns:
        shown = ", ".join(columns[:20]) + (", ..." if len(columns) > 20 else "")
        raise ManifestError(
            f"{_display(spec.url)}: no image column {image_column!r} in the CSV header "
            f"(columns: {shown}); set image_column",
            parameter="image_column",
        )
    return columns


def _check_first_record(spec: ManifestSpec, fmt: str, record: bytes) -> tuple[str, ...]:
    """CSV: parse the header. JSONL: the first line must be a JSON object."""
    if fmt == "csv":
        return _parse_header(spec, record)
    try:
        first = json.loads(record)
    except ValueError:
        first = None
    if not isinstance(first, dict):
        raise ManifestError(
            f"{_display(spec.url)}: the first line is not a JSON object; not a JSONL manifest"
        )
    return ()


def _plan_parquet(spec: ManifestSpec, shard_size: int) -> Iterator[ShardSpec]:
    with _open_parquet(spec) as parquet:
        total = parquet.metadata.num_rows
    for index, start in enumerate(range(0, total, shard_size)):
        yield ShardSpec(
            manifest=spec,
            index=index,
            row_start=start,
            row_stop=min(start + shard_size, total),
            byte_start=None,
            byte_stop=None,
        )


class _ParquetHandle:
    """An open fsspec file plus its ParquetFile, checked for a usable image column."""

    def __init__(self, spec: ManifestSpec) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.file = _open_raw(spec)
        try:
            self.parquet = pq.ParquetFile(self.file)
        except (pa.ArrowException, OSError, ValueError) as exc:
            self.file.close()
            raise ManifestError(
                f"{_display(spec.url)}: not a readable Parquet file ({exc})"
            ) from None
        schema = self.parquet.schema_arrow
        self.names = {name.strip(): name for name in reversed(schema.names)}
        image_column = spec.image_column.strip()
        if image_column not in self.names:
            self.file.close()
            raise ManifestError(
                f"{_display(spec.url)}: no image column {image_column!r} in the Parquet schema "
                f"(columns: {', '.join(schema.names[:20])}); set image_column",
                parameter="image_column",
            )
        kind = schema.field(self.names[image_column]).type
        if pa.types.is_dictionary(kind):
            kind = kind.value_type
        if str(kind) not in _STRING_TYPES:
            self.file.close()
            raise ManifestError(
                f"{_display(spec.url)}: image column {image_column!r} has type {kind}, "
                "expected strings",
                parameter="image_column",
            )

    @property
    def metadata(self) -> Any:
        return self.parquet.metadata

    def __enter__(self) -> _ParquetHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()


def _open_parquet(spec: ManifestSpec) -> _ParquetHandle:
    return _ParquetHandle(spec)


# -- reading ---------------------------------------------------------------------------------


def read_shard(shard: ShardSpec) -> Iterator[ManifestRow]:
    """Yield exactly the rows of ``shard``, reading only its bytes or its row groups."""
    fmt, compression = detect_format(shard.manifest)
    rows = _read_parquet(shard) if fmt == "parquet" else _read_lines(shard, fmt, compression)
    expected = shard.row_start
    for item in rows:
        if expected >= shard.row_stop:
            expected += 1  # more rows than planned
            break
        yield item
        expected += 1
    if expected != shard.row_stop:
        raise ManifestError(
            f"{_display(shard.manifest.url)}: shard {shard.index} does not hold the "
            f"{shard.num_rows} rows planned for it; did the manifest change after planning?"
        )


def _range_blocks(
    spec: ManifestSpec, compression: str | None, start: int, stop: int
) -> Iterator[bytes]:
    """The bytes ``[start, stop)`` of the (decompressed) manifest, in READ_BLOCK_SIZE pieces."""
    if compression is None:
        fs, path = _fs_path(spec)
        position = start
        while position < stop:
            end = min(position + READ_BLOCK_SIZE, stop)
            try:
                block = fs.cat_file(path, start=position, end=end)
            except FileNotFoundError as exc:
                raise ManifestError(f"manifest not found: {_display(spec.url)}") from exc
            if not block:
                return
            position += len(block)
            yield block
        return
    with _open(spec, compression) as stream:
        skip = start
        while skip > 0:
            chunk = stream.read(min(BLOCK_SIZE, skip))
            if not chunk:
                return
            skip -= len(chunk)
        yield from _blocks(stream, limit=stop - start, block_size=READ_BLOCK_SIZE)


def _records(blocks: Iterable[bytes], fmt: str, base: int) -> Iterator[list[bytes]]:
    """Data records of a byte range, one list per region (all rules as in planning)."""
    asm = _Assembler(fmt, keep=True)
    for region, _, complete in _regions(blocks, base):
        batch = [rec for line in _lines(region, complete) if (rec := asm.feed(line)) is not None]
        if batch:
            yield batch
    tail = asm.finish()
    if tail is not None:
        yield [tail]


def _read_lines(shard: ShardSpec, fmt: str, compression: str | None) -> Iterator[ManifestRow]:
    spec = shard.manifest
    start = shard.byte_start or 0
    stop = shard.byte_stop if shard.byte_stop is not None else start
    blocks = _range_blocks(spec, compression, start, stop)
    if fmt == "csv":
        columns = shard.columns or _read_header(spec, compression)
        parse = _csv_parser(spec, columns)
    elif fmt == "jsonl":
        parse = _jsonl_parser(spec)
    else:
        parse = _text_parser
    image_column = spec.image_column.strip()
    row = shard.row_start
    for batch in _records(blocks, fmt, start):
        for values in parse(batch):
            yield _make_row(row, values, image_column)
            row += 1


def _read_header(spec: ManifestSpec, compression: str | None) -> tuple[str, ...]:
    """Read the CSV header from the start of the manifest (for shards planned elsewhere)."""
    asm = _Assembler("csv", keep=True)
    with _open(spec, compression) as stream:
        for region, _, complete in _regions(_blocks(stream), 0):
            for line in _lines(region, complete):
                record = asm.feed(line)
                if record is not None:
                    return _parse_header(spec, record)
    raise ManifestError(f"{_display(spec.url)}: no CSV header")


_Parsed = Mapping[str, Any]


def _bad_record(message: str) -> dict[str, Any]:
    """Values that make :func:`_make_row` report ``message`` (a whole-record problem)."""
    return {"@record": message}


def _csv_parser(
    spec: ManifestSpec, columns: tuple[str, ...]
) -> Callable[[list[bytes]], Iterator[_Parsed]]:
    roles = _roles(spec)
    picks = [(roles[name], i) for i, name in enumerate(columns) if name in roles]
    width = len(columns)

    def pick(fields: list[str]) -> _Parsed:
        if len(fields) != width:
            return _bad_record(f"{len(fields)} CSV fields, the header has {width}")
        return {role: fields[i] for role, i in picks}

    def parse(batch: list[bytes]) -> Iterator[_Parsed]:
        try:
            texts = [record.decode("utf-8") for record in batch]
            parsed = list(csv.reader(texts, strict=True))
        except (UnicodeDecodeError, csv.Error):
            parsed = None
        if parsed is not None and len(parsed) == len(batch):
            for fields in parsed:
                yield pick(fields)
            return
        for record in batch:  # slow path: find the bad record(s)
            try:
                rows = list(csv.reader([record.decode("utf-8")], strict=True))
            except UnicodeDecodeError:
                yield _bad_record("not valid UTF-8")
                continue
            except csv.Error as exc:
                yield _bad_record(f"malformed CSV record ({exc})")
                continue
            if len(rows) != 1:
                yield _bad_record("malformed CSV record")
            else:
                yield pick(rows[0])

    return parse


def _jsonl_parser(spec: ManifestSpec) -> Callable[[list[bytes]], Iterator[_Parsed]]:
    roles = _roles(spec)

    def parse(batch: list[bytes]) -> Iterator[_Parsed]:
        for record in batch:
            try:
                obj = json.loads(record)
            except ValueError as exc:
                yield _bad_record(f"invalid JSON ({exc})")
                continue
            if not isinstance(obj, dict):
                yield _bad_record(f"a JSON {type(obj).__name__}, expected an object")
                continue
            values: dict[str, Any] = {}
            for key, value in obj.items():
                role = roles.get(key) or roles.get(key.strip())
                if role is not None:
                    values[role] = value
            yield values

    return parse


def _text_parser(batch: list[bytes]) -> Iterator[_Parsed]:
    for record in batch:
        try:
            yield {"image": record.decode("utf-8").lstrip("\ufeff")}
        except UnicodeDecodeError:
            yield _bad_record("not valid UTF-8")


def _read_parquet(shard: ShardSpec) -> Iterator[ManifestRow]:
    spec = shard.manifest
    roles = _roles(spec)
    with _open_parquet(spec) as handle:
        metadata = handle.metadata
        groups: list[int] = []
        first_row = None
        position = 0
        for index in range(metadata.num_row_groups):
            size = metadata.row_group(index).num_rows
            if position < shard.row_stop and position + size > shard.row_start:
                groups.append(index)
                if first_row is None:
                    first_row = position
            position += size
        if not groups or first_row is None:
            return
        wanted = {actual: roles[name] for name, actual in handle.names.items() if name in roles}
        skip = shard.row_start - first_row
        image_column = spec.image_column.strip()
        row = shard.row_start
        batches = handle.parquet.iter_batches(
            batch_size=8192, row_groups=groups, columns=list(wanted)
        )
        for batch in batches:
            if skip >= batch.num_rows:
                skip -= batch.num_rows
                continue
            if skip:
                batch = batch.slice(skip)
                skip = 0
            batch = batch.slice(0, shard.row_stop - row)
            columns = [
                (wanted[name], batch.column(name).to_pylist()) for name in batch.schema.names
            ]
            for i in range(batch.num_rows):
                values = {role: column[i] for role, column in columns}
                yield _make_row(row, values, image_column)
                row += 1
            if row >= shard.row_stop:
                return
