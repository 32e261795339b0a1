"""Manifest planning and shard reading (connectors/manifest.py).

The core property: for every format, location and shard size, the shards cover every data
row exactly once, in order, and each shard alone yields exactly its rows with the right
values. Small block sizes are forced in some tests so that records straddle read blocks.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import itertools
import json
import os
import pickle
import subprocess
import sys
import textwrap
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import connectors.manifest as manifest
from connectors.manifest import (
    ManifestError,
    ManifestRow,
    ManifestSpec,
    ShardSpec,
    plan_shards,
    read_shard,
)
from guideflow.errors import InvalidParameter
from tests.s3 import s3_options

REPO = Path(__file__).resolve().parents[1]
N_ROWS = 23


def uri_hash(uri: str) -> str:
    return hashlib.sha256(uri.encode()).hexdigest()[:16]


# -- manifest fixtures ---------------------------------------------------------------------


def records(n: int = N_ROWS) -> list[dict[str, Any]]:
    """Rows with an id on even rows only, a width on every third row, a preprocessor on some."""
    out = []
    for i in range(n):
        row: dict[str, Any] = {"image": f"s3://bucket/img-{i:03d}.jpg"}
        row["id"] = f"id-{i}" if i % 2 == 0 else ""
        row["width"] = 64 + i if i % 3 == 0 else None
        row["preprocessor"] = "canny" if i % 4 == 0 else None
        out.append(row)
    return out


def expected_rows(recs: list[dict[str, Any]], *, text: bool = False) -> list[tuple]:
    """(row, image, id, preprocessor, settings) as read_shard should report them."""
    out = []
    for i, rec in enumerate(recs):
        ident = uri_hash(rec["image"]) if text or not rec["id"] else rec["id"]
        settings = {} if text or rec["width"] is None else {"width": rec["width"]}
        out.append((i, rec["image"], ident, None if text else rec["preprocessor"], settings))
    return out


def csv_bytes(recs: list[dict[str, Any]]) -> bytes:
    """CSV with a padded header, a blank and a whitespace-only line, no final newline."""
    lines = [" id , image ,width, preprocessor ,ignored"]
    for i, rec in enumerate(recs):
        width = "" if rec["width"] is None else str(rec["width"])
        lines.append(f"{rec['id']},{rec['image']},{width},{rec['preprocessor'] or ''},x{i}")
        if i == 5:
            lines.append("")
        if i == 11:
            lines.append("   \r")
    return "\n".join(lines).encode()


def jsonl_bytes(recs: list[dict[str, Any]]) -> bytes:
    lines = []
    for i, rec in enumerate(recs):
        obj = {k: v for k, v in rec.items() if v not in (None, "")}
        obj["extra"] = [i]  # unknown keys are ignored
        lines.append(json.dumps(obj))
        if i in (0, 9):
            lines.append("  ")
    return ("\n".join(lines) + "\n").encode()


def text_bytes(recs: list[dict[str, Any]]) -> bytes:
    lines = ["# a comment line", ""]
    for i, rec in enumerate(recs):
        lines.append(f"  {rec['image']}  ")
        if i == 7:
            lines.append("   # indented comment")
    return ("\r\n".join(lines) + "\r\n").encode()


def parquet_bytes(recs: list[dict[str, Any]], row_group_size: int = 5) -> bytes:
    table = pa.table(
        {
            "id": [r["id"] for r in recs],
            "image": [r["image"] for r in recs],
            "width": pa.array([r["width"] for r in recs], type=pa.int64()),
            "preprocessor": [r["preprocessor"] for r in recs],
            "ignored": list(range(len(recs))),
        }
    )
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=row_group_size)
    return sink.getvalue()


WRITERS: dict[str, tuple[str, Callable[[list[dict[str, Any]]], bytes]]] = {
    "csv": ("csv", csv_bytes),
    "jsonl": ("jsonl", jsonl_bytes),
    "text": ("txt", text_bytes),
    "parquet": ("parquet", parquet_bytes),
}


@pytest.fixture()
def memory_root() -> Iterator[str]:
    root = f"/gf-manifest-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture()
def place(tmp_path: Path, memory_root: str) -> Callable[[str, str, bytes], str]:
    """place(location, filename, data) -> URL of the stored file."""

    def _place(location: str, name: str, data: bytes) -> str:
        if location == "memory":
            url = f"memory://{memory_root}/{name}"
        elif location == "path":
            url = str(tmp_path / name)
        else:
            url = (tmp_path / name).as_uri()
        with fsspec.open(url, "wb") as f:
            f.write(data)
        return url

    return _place


def collect(spec: ManifestSpec, shard_size: int) -> tuple[list[ShardSpec], list[ManifestRow]]:
    shards = list(plan_shards(spec, shard_size))
    rows = [row for shard in shards for row in read_shard(shard)]
    return shards, rows


def as_tuples(rows: list[ManifestRow]) -> list[tuple]:
    for row in rows:
        assert row.error is None, row.error
    return [(r.row, r.image, r.id, r.preprocessor, r.settings) for r in rows]


def check_cover(shards: list[ShardSpec], total: int, shard_size: int) -> None:
    """Shards are numbered 0.., contiguous in rows (and bytes), full except the last."""
    assert [s.index for s in shards] == list(range(len(shards)))
    assert shards[0].row_start == 0 and shards[-1].row_stop == total
    for before, after in itertools.pairwise(shards):
        assert after.row_start == before.row_stop
        if before.byte_stop is not None:
            assert after.byte_start == before.byte_stop
    assert all(s.num_rows == shard_size for s in shards[:-1])
    assert 1 <= shards[-1].num_rows <= shard_size


# -- every format x location x shard size ----------------------------------------------------


@pytest.mark.parametrize("shard_size", [1, 7, 1000])
@pytest.mark.parametrize("location", ["memory", "path", "file-url"])
@pytest.mark.parametrize("fmt", ["csv", "jsonl", "text", "parquet"])
def test_shards_cover_all_rows_once_in_order(fmt, location, shard_size, place):
    recs = records()
    ext, write = WRITERS[fmt]
    url = place(location, f"manifest.{ext}", write(recs))
    shards, rows = collect(ManifestSpec(url), shard_size)
    check_cover(shards, N_ROWS, shard_size)
    assert as_tuples(rows) == expected_rows(recs, text=fmt == "text")
    assert all(s.manifest.format == fmt for s in shards)
    if fmt == "parquet":
        assert all(s.byte_start is None and s.byte_stop is None for s in shards)
    else:
        assert all(s.byte_start is not None and s.byte_stop is not None for s in shards)


@pytest.mark.parametrize("shard_size", [1, 7, 1000])
@pytest.mark.parametrize("location", ["memory", "path", "file-url"])
@pytest.mark.parametrize("fmt", ["csv", "jsonl", "text"])
def test_gzip_line_manifests(fmt, location, shard_size, place):
    recs = records()
    ext, write = WRITERS[fmt]
    url = place(location, f"manifest.{ext}.gz", gzip.compress(write(recs)))
    shards, rows = collect(ManifestSpec(url), shard_size)
    check_cover(shards, N_ROWS, shard_size)
    assert as_tuples(rows) == expected_rows(recs, text=fmt == "text")
    # offsets count decompressed bytes
    assert shards[-1].byte_stop <= len(write(recs))


@pytest.mark.parametrize(
    ("fmt", "suffix"), [("csv", ""), ("jsonl", ".gz"), ("text", ""), ("parquet", "")]
)
def test_s3_manifests(fmt, suffix, s3_endpoint, s3_bucket):
    """The same manifests on S3 (moto), reached through storage_options."""
    recs = records()
    ext, write = WRITERS[fmt]
    data = write(recs)
    url = f"{s3_bucket}/in/manifest.{ext}{suffix}"
    options = s3_options(s3_endpoint)
    with fsspec.open(url, "wb", **options) as f:
        f.write(gzip.compress(data) if suffix else data)
    spec = ManifestSpec(url, storage_options=options)
    shards, rows = collect(spec, 7)
    check_cover(shards, N_ROWS, 7)
    expected = expected_rows(recs, text=fmt == "text")
    assert as_tuples(rows) == expected
    assert as_tuples(list(read_shard(shards[1]))) == expected[7:14]


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "text"])
@pytest.mark.parametrize("block", [1, 5, 64])
def test_tiny_read_blocks_give_the_same_shards_and_rows(fmt, block, place, monkeypatch):
    """Records straddling read blocks (and the numpy fast path vs the line loop) agree."""
    recs = records(40)
    ext, write = WRITERS[fmt]
    url = place("memory", f"m.{ext}", write(recs))
    reference_shards, reference_rows = collect(ManifestSpec(url), 7)
    monkeypatch.setattr(manifest, "BLOCK_SIZE", block)
    monkeypatch.setattr(manifest, "READ_BLOCK_SIZE", block)
    shards, rows = collect(ManifestSpec(url), 7)
    assert shards == reference_shards
    assert as_tuples(rows) == as_tuples(reference_rows) == expected_rows(recs, text=fmt == "text")


def test_a_shard_reads_only_its_own_bytes(place):
    """Overwrite every byte outside one shard's range: that shard still reads correctly."""
    recs = records(30)
    data = csv_bytes(recs)
    url = place("path", "m.csv", data)
    shards = list(plan_shards(ManifestSpec(url), 7))
    target = shards[2]
    before = list(read_shard(target))
    scrambled = bytearray(b"\x00" * len(data))
    scrambled[target.byte_start : target.byte_stop] = data[target.byte_start : target.byte_stop]
    Path(url).write_bytes(bytes(scrambled))
    after = list(read_shard(target))
    assert as_tuples(after) == as_tuples(before) == expected_rows(recs)[14:21]


def test_planning_streams(place, monkeypatch):
    """The first shard comes out long before the whole manifest has been read."""
    recs = records(2000)
    data = text_bytes(recs)
    url = place("memory", "m.txt", data)
    monkeypatch.setattr(manifest, "BLOCK_SIZE", 1024)
    read = []
    original = manifest._open_raw

    class Counting:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            chunk = self.f.read(n)
            read.append(len(chunk))
            return chunk

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(manifest, "_open_raw", lambda spec: Counting(original(spec)))
    planner = plan_shards(ManifestSpec(url), 10)
    first = next(planner)
    assert first.row_stop == 10
    assert sum(read) <= 2048 < len(data)
    assert len(list(planner)) == 199


# -- CSV specifics ----------------------------------------------------------------------------


QUOTED = (
    b"image,id,settings\r\n"
    b'"s3://b/a,1.jpg",a,"{""cannyLow"": 1}"\r\n'
    b'"s3://b/multi\r\nline.jpg",b,\r\n'
    b'"s3://b/""q"".jpg","c\nc",\r\n'
    b"\r\n"
    b's3://b/plain.jpg,d,"{""x"":\n ""y""}"\r\n'
)


@pytest.mark.parametrize("shard_size", [1, 2, 7])
def test_csv_quoted_newlines_commas_and_quotes(shard_size, place):
    url = place("memory", "q.csv", QUOTED)
    shards, rows = collect(ManifestSpec(url), shard_size)
    check_cover(shards, 4, shard_size)
    assert [(r.image, r.id, r.settings) for r in rows] == [
        ("s3://b/a,1.jpg", "a", {"cannyLow": 1}),
        ("s3://b/multi\r\nline.jpg", "b", {}),
        ('s3://b/"q".jpg', "c\nc", {}),
        ("s3://b/plain.jpg", "d", {"x": "y"}),
    ]
    assert all(r.error is None for r in rows)


def test_csv_types_are_converted():
    data = (
        "\ufeffimage,width,height,lowThresholdCanny,highThresholdCanny,"
        "includeHandsAndFaceOpenPose,preprocessor,settings\n"
        "u0,512, 768 ,100,200,yes, openpose ,\n"
        "u1,512.0,,+7,,No,,\n"
        'u2,,,,,TRUE,,"{""outputQuality"": 80}"\n'
        "u3,,,,,0,,{}\n"
    ).encode()
    fs = fsspec.filesystem("memory")
    fs.pipe("/gf-manifest-types/m.csv", data)
    try:
        _, rows = collect(ManifestSpec("memory://gf-manifest-types/m.csv"), 10)
    finally:
        fs.rm("/gf-manifest-types", recursive=True)
    assert [r.error for r in rows] == [None] * 4
    assert rows[0].settings == {
        "width": 512,
        "height": 768,
        "lowThresholdCanny": 100,
        "highThresholdCanny": 200,
        "includeHandsAndFaceOpenPose": True,
    }
    assert rows[0].preprocessor == "openpose"
    assert rows[1].settings == {
        "width": 512,
        "lowThresholdCanny": 7,
        "includeHandsAndFaceOpenPose": False,
    }
    assert rows[2].settings == {"includeHandsAndFaceOpenPose": True, "outputQuality": 80}
    assert rows[3].settings == {"includeHandsAndFaceOpenPose": False}
    assert all(type(v) is int for v in rows[0].settings.values() if not isinstance(v, bool))


def test_csv_bad_rows_get_errors_and_the_run_goes_on(place):
    data = (
        b"id,image,width,includeHandsAndFaceOpenPose,settings\n"
        b"ok,s3://b/0.jpg,64,,\n"
        b"w,s3://b/1.jpg,abc,,\n"
        b"f,s3://b/2.jpg,12.5,,\n"
        b"e,,64,,\n"
        b"b,s3://b/4.jpg,,maybe,\n"
        b'j,s3://b/5.jpg,,,"{not json"\n'
        b"l,s3://b/6.jpg,,,[1]\n"
        b'c,s3://b/7.jpg,64,,"{""width"": 32}"\n'
        b"n,s3://b/8.jpg,64\n"
        b"ok2,s3://b/9.jpg,,,\n"
        b'q,"s3://b/10.jpg,,,\n'
    )
    url = place("memory", "bad.csv", data)
    _, rows = collect(ManifestSpec(url), 3)
    assert [r.row for r in rows] == list(range(11))
    errors = [r.error for r in rows]
    assert errors[0] is None and errors[9] is None
    assert rows[0].settings == {"width": 64} and rows[9].image == "s3://b/9.jpg"
    bad = {i: e for i, e in enumerate(errors) if e is not None}
    assert set(bad) == {1, 2, 3, 4, 5, 6, 7, 8, 10}
    assert all(
        isinstance(e, InvalidParameter) and e.code == "invalidParameter" for e in bad.values()
    )
    params = {i: e.parameter for i, e in bad.items()}
    assert params == {
        1: "width",
        2: "width",
        3: "image",
        4: "includeHandsAndFaceOpenPose",
        5: "settings",
        6: "settings",
        7: "settings.width",
        8: None,  # wrong number of fields: the whole record is suspect
        10: None,  # unbalanced quote running to the end of the file
    }
    assert "abc" in bad[1].message and "12.5" in bad[2].message
    assert "3 CSV fields" in bad[8].message
    # ids survive errors where the row still has them; a broken record gets row-<n>
    assert rows[1].id == "w" and rows[8].id == "row-8" and rows[3].id == "e"


def test_csv_configurable_columns_and_ids(place):
    data = b"Key , URL \n k1 , s3://b/x.jpg \n , s3://b/y.jpg \n"
    url = place("path", "m.csv", data)
    _, rows = collect(ManifestSpec(url, image_column="URL", id_column="Key"), 5)
    assert [(r.image, r.id) for r in rows] == [
        ("s3://b/x.jpg", "k1"),
        ("s3://b/y.jpg", uri_hash("s3://b/y.jpg")),
    ]


def test_csv_shard_without_captured_header_reads_it(place):
    url = place("memory", "m.csv", csv_bytes(records()))
    shards = list(plan_shards(ManifestSpec(url), 7))
    bare = [ShardSpec.from_dict({**s.to_dict(), "columns": []}) for s in shards]
    assert bare[1].columns == ()
    rows = [r for s in bare for r in read_shard(s)]
    assert as_tuples(rows) == expected_rows(records())


def test_format_override_and_extension_detection(place):
    data = csv_bytes(records())
    url = place("memory", "manifest.dat", data)
    assert manifest.detect_format(ManifestSpec(url)) == ("text", None)
    _, rows = collect(ManifestSpec(url, format="CSV"), 100)
    assert as_tuples(rows) == expected_rows(records())
    assert manifest.detect_format(ManifestSpec("s3://b/m.ndjson.gz")) == ("jsonl", "gzip")
    assert manifest.detect_format(ManifestSpec("s3://b/m.pq")) == ("parquet", None)
    assert manifest.detect_format(ManifestSpec("https://h/m.csv?X-Amz-Signature=1")) == (
        "csv",
        None,
    )
    assert manifest.detect_format(ManifestSpec("/data/csv")) == ("text", None)


# -- JSONL and Parquet specifics --------------------------------------------------------------


def test_jsonl_values_keep_types_and_are_validated(place):
    lines = [
        {"image": "u0", "width": 512, "includeHandsAndFaceOpenPose": True, "id": 17},
        {"image": "u1", "width": "640", "settings": {"a": [1]}},
        {"image": "u2", "width": 512.0},
        {"image": "u3", "width": True},
        {"image": "u4", "settings": '{"b": 2}'},
        {"image": 5},
        {" image ": "u6", "height": None},
    ]
    text = "\n".join(json.dumps(x) for x in lines) + "\n{oops\n[1, 2]\n"
    url = place("memory", "m.jsonl", text.encode())
    _, rows = collect(ManifestSpec(url), 4)
    assert len(rows) == 9
    assert rows[0].settings == {"width": 512, "includeHandsAndFaceOpenPose": True}
    assert rows[0].id == "17"
    assert rows[1].settings == {"width": 640, "a": [1]}
    assert rows[2].settings == {"width": 512} and type(rows[2].settings["width"]) is int
    assert rows[3].error.parameter == "width"  # a bool is not an integer
    assert rows[4].settings == {"b": 2}
    assert rows[5].error.parameter == "image"
    assert rows[6].image == "u6" and rows[6].error is None and rows[6].settings == {}
    assert "invalid JSON" in rows[7].error.message
    assert "expected an object" in rows[8].error.message
    assert [r.error is None for r in rows] == [True, True, True, False, True, False, True] + [
        False
    ] * 2


def test_parquet_reads_only_overlapping_row_groups(place, monkeypatch):
    recs = records(50)
    url = place("memory", "m.parquet", parquet_bytes(recs, row_group_size=10))
    assert pq.ParquetFile(fsspec.open(url).open()).metadata.num_row_groups == 5
    calls = []
    original = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        calls.append((kwargs.get("row_groups"), sorted(kwargs.get("columns") or [])))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    shards = list(plan_shards(ManifestSpec(url), 7))
    assert calls == []  # planning reads the footer only
    check_cover(shards, 50, 7)
    rows = list(read_shard(shards[2]))  # rows 14..20: row groups 1 and 2
    assert calls == [([1, 2], ["id", "image", "preprocessor", "width"])]
    assert as_tuples(rows) == expected_rows(recs)[14:21]


def test_parquet_missing_values_and_native_types(place):
    table = pa.table(
        {
            "image": ["u0", None, "u2", "u3"],
            "width": pa.array([512.0, float("nan"), 3.5, None]),
            "includeHandsAndFaceOpenPose": [True, None, False, None],
            "settings": ['{"k": 1}', None, None, "nope"],
        }
    )
    sink = io.BytesIO()
    pq.write_table(table, sink)
    url = place("path", "m.parquet", sink.getvalue())
    _, rows = collect(ManifestSpec(url), 3)
    assert rows[0].settings == {"width": 512, "includeHandsAndFaceOpenPose": True, "k": 1}
    assert rows[1].error.parameter == "image" and rows[1].id == "row-1"
    assert rows[2].error.parameter == "width"
    assert rows[3].error.parameter == "settings"


# -- invalid manifests --------------------------------------------------------------------------


def _plan_error(spec: ManifestSpec) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        next(iter(plan_shards(spec, 10)))
    assert info.value.code == "invalidManifest"
    assert info.value.to_error_object()["code"] == "invalidManifest"
    return info.value


def test_invalid_manifests_raise_at_plan_time(place):
    garbage = bytes(range(256)) * 64
    assert "NUL byte" in _plan_error(ManifestSpec(place("memory", "g.csv", garbage))).message
    latin1 = "image\ncaf\xe9.jpg\n".encode("latin-1")
    assert "UTF-8" in _plan_error(ManifestSpec(place("memory", "l.csv", latin1))).message
    missing = _plan_error(ManifestSpec(place("memory", "n.csv", b"url,id\ns3://b/x,1\n")))
    assert missing.parameter == "image_column" and "url, id" in missing.message
    assert "header" in _plan_error(ManifestSpec(place("memory", "e.csv", b"\n \n"))).message
    dup = _plan_error(ManifestSpec(place("memory", "d.csv", b"image,image\na,b\n")))
    assert dup.parameter == "image"
    not_json = _plan_error(ManifestSpec(place("memory", "c.jsonl", b"image,id\nx,1\n")))
    assert "JSON object" in not_json.message
    bad_pq = _plan_error(ManifestSpec(place("memory", "g.parquet", b"PAR1 not really")))
    assert "Parquet" in bad_pq.message
    no_col = parquet_bytes(records(3))
    err = _plan_error(ManifestSpec(place("memory", "x.parquet", no_col), image_column="url"))
    assert err.parameter == "image_column"
    int_images = io.BytesIO()
    pq.write_table(pa.table({"image": [1, 2]}), int_images)
    err = _plan_error(ManifestSpec(place("memory", "i.parquet", int_images.getvalue())))
    assert "int64" in err.message
    assert "not found" in _plan_error(ManifestSpec(place("memory", "a.txt", b"") + "x")).message
    assert _plan_error(ManifestSpec("s3://b/m.parquet.gz")).message
    assert _plan_error(ManifestSpec("memory://x/m.csv", format="xlsx")).parameter == "format"


def test_zstd_needs_its_codec(place):
    """.zst is decompressed when the codec is installed, else a clear invalidManifest."""
    data = text_bytes(records())
    try:
        import zstandard
    except ImportError:
        err = _plan_error(ManifestSpec(place("memory", "m.txt.zst", data)))
        assert "zstandard" in err.message
        return
    url = place("memory", "m.txt.zst", zstandard.ZstdCompressor().compress(data))
    _, rows = collect(ManifestSpec(url), 7)
    assert as_tuples(rows) == expected_rows(records(), text=True)


def test_empty_manifests_have_no_shards(place):
    assert list(plan_shards(ManifestSpec(place("memory", "e.txt", b"# nothing\n\n")))) == []
    assert list(plan_shards(ManifestSpec(place("memory", "e.jsonl", b"")))) == []
    assert list(plan_shards(ManifestSpec(place("memory", "h.csv", b"id,image\n")))) == []
    assert list(plan_shards(ManifestSpec(place("memory", "e.parquet", parquet_bytes([]))))) == []


def test_changed_manifest_is_detected_when_reading(place):
    url = place("path", "m.txt", text_bytes(records()))
    shards = list(plan_shards(ManifestSpec(url), 7))
    Path(url).write_bytes(b"\n".join(f"s3://b/{i}".encode() for i in range(100)))
    with pytest.raises(ManifestError, match="7 rows planned"):
        list(read_shard(shards[1]))  # more rows in the range now
    Path(url).write_bytes(b"s3://b/only-one\n" + b"\n" * 2000)
    with pytest.raises(ManifestError, match="7 rows planned"):
        list(read_shard(shards[1]))  # fewer rows


def test_shard_size_must_be_positive():
    with pytest.raises(ValueError):
        next(plan_shards(ManifestSpec("memory://x/m.txt"), 0))


# -- serialisation ------------------------------------------------------------------------------


def test_shards_are_json_and_pickle_round_trippable(place):
    url = place("memory", "m.csv", csv_bytes(records()))
    spec = ManifestSpec(url, image_column="image", storage_options={"skip_instance_cache": True})
    shards = list(plan_shards(spec, 7))
    for shard in shards:
        wire = json.loads(json.dumps(shard.to_dict()))
        assert ShardSpec.from_dict(wire) == shard
        assert pickle.loads(pickle.dumps(shard)) == shard
        assert hash(shard) == hash(ShardSpec.from_dict(wire))
    again = [r for s in shards for r in read_shard(ShardSpec.from_dict(s.to_dict()))]
    assert as_tuples(again) == expected_rows(records())


def test_row_ids_hash_the_stripped_uri(place):
    url = place("memory", "m.txt", b"  s3://b/\xc3\xa9t\xc3\xa9.jpg \n")
    (row,) = [r for s in plan_shards(ManifestSpec(url)) for r in read_shard(s)]
    assert row.image == "s3://b/été.jpg"
    assert row.id == hashlib.sha256("s3://b/été.jpg".encode()).hexdigest()[:16]
    assert len(row.id) == 16


# -- memory ------------------------------------------------------------------------------------

MILLION = 1_000_000


@pytest.fixture(scope="module")
def million_csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("manifest") / "million.csv"
    with path.open("w", newline="") as f:
        f.write("id,image,preprocessor,width\n")
        for start in range(0, MILLION, 100_000):
            f.writelines(
                f"{i},s3://bucket/images/2024-06/batch-0001/{i:08d}.jpg,canny,512\n"
                for i in range(start, start + 100_000)
            )
    return path


def test_memory_stays_flat_planning_a_million_rows(million_csv):
    """tracemalloc peak < 50 MB while planning 1M rows and reading shards anywhere in them."""
    tracemalloc.start()
    try:
        shards = list(plan_shards(ManifestSpec(str(million_csv)), 10_000))
        tail = []
        for shard in (shards[0], shards[len(shards) // 2], shards[-1]):
            for row in read_shard(shard):
                tail.append((row.row, row.id)) if row.row % 5_000 == 0 else None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert million_csv.stat().st_size > 50 * 2**20  # holding the file would break the limit
    assert len(shards) == 100
    check_cover(shards, MILLION, 10_000)
    assert shards[-1].byte_stop == million_csv.stat().st_size
    assert tail == [(r, str(r)) for r in (0, 5_000, 500_000, 505_000, 990_000, 995_000)]
    assert peak < 50 * 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_memory_stays_flat_reading_a_million_rows(million_csv):
    """Plan and read every row in a fresh process; its peak RSS grows by < 50 MB.

    (Reading all rows under tracemalloc would take minutes, so the whole pass is measured
    with the kernel's high-water mark instead; a reader that kept rows would grow >500 MB.)
    """
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc (Linux) to read the peak RSS")
    script = textwrap.dedent(
        """
        import sys
        from connectors.manifest import ManifestSpec, plan_shards, read_shard

        def status(field):
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(field):
                        return int(line.split()[1]) * 1024

        base = status("VmRSS:")
        count = errors = 0
        last = None
        for shard in plan_shards(ManifestSpec(sys.argv[1]), 10_000):
            for row in read_shard(shard):
                count += 1
                errors += row.error is not None
                last = row
        print(count, errors, last.row, last.image, last.settings["width"])
        print(status("VmHWM:") - base)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(million_csv)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=True,
    )
    summary, growth = done.stdout.split("\n")[:2]
    assert (
        summary
        == f"{MILLION} 0 {MILLION - 1} s3://bucket/images/2024-06/batch-0001/00999999.jpg 512"
    )
    assert int(growth) < 50 * 2**20, f"RSS grew {int(growth) / 2**20:.1f} MiB"


def _csv_rows(data: bytes) -> list[list[str]]:
    """Reference parse with the csv module (used to cross-check a generated manifest)."""
    return list(csv.reader(io.StringIO(data.decode(), newline="")))


def test_generated_csv_matches_the_csv_module(place, monkeypatch):
    """Random-ish quoting across tiny blocks: same rows as csv.reader over the whole file."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\r\n", quoting=csv.QUOTE_MINIMAL)
    writer.writerow(["image", "id"])
    for i in range(200):
        image = f"s3://b/{i}" + (',"\n' * (i % 3)) + ("x" * (i % 11))
        writer.writerow([image, f"id{i}"])
    data = buf.getvalue().encode()
    url = place("memory", "gen.csv", data)
    monkeypatch.setattr(manifest, "BLOCK_SIZE", 13)
    monkeypatch.setattr(manifest, "READ_BLOCK_SIZE", 29)
    _, rows = collect(ManifestSpec(url), 7)
    assert [(r.image, r.id) for r in rows] == [
        (image.strip(), ident) for image, ident in _csv_rows(data)[1:]
    ]
