"""The parquet cost ledger: writes, hive reads, atomicity, secrets, DoneIndex, summaries, CLI.

S3 tests run against the session's moto server (tests/s3.py); local and ``memory://``
ledgers need nothing else.
"""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from connectors import ledger
from connectors.ledger import (
    LEDGER_SCHEMA,
    DoneIndex,
    LedgerRow,
    LedgerWriter,
    duplicate_successes,
    key_hashes,
    read_ledger,
    rows_to_table,
    settings_hash,
    summarize,
    summary_totals,
)
from guideflow.cli import app
from guideflow.errors import InvalidParameter
from tests.s3 import s3_options

T0 = dt.datetime(2024, 5, 1, 12, 0, 0, 123000, tzinfo=dt.UTC)
CANNY = settings_hash("canny", {"lowThresholdCanny": 100, "width": 512})
DEPTH = settings_hash("depth", {"width": 512})


def row(run: str, i: int, pre: str, status: str, **kw: Any) -> LedgerRow:
    """One ledger row with sensible defaults; cost follows the status unless given."""
    cost = {"canny": 0.0006, "depth": 0.0013}[pre] if status == "success" else 0.0
    values: dict[str, Any] = {
        "run_id": run,
        "shard": 0,
        "row": i,
        "image_id": f"img-{i}",
        "input_uri": f"s3://photos/in/{i}.png",
        "preprocessor": pre,
        "variant": "default",
        "settings_json": '{"width":512}',
        "settings_hash": CANNY if pre == "canny" else DEPTH,
        "task_uuid": f"00000000-0000-4000-8000-{i:012d}",
        "status": status,
        "cost_usd": cost,
        "latency_ms": 12.5 + i,
        "attempts": 1 if status != "skipped" else 0,
        "backend": "local",
        "started_at": T0,
        "finished_at": T0 + dt.timedelta(milliseconds=250),
    }
    if status == "success":
        values["output_uri"] = f"s3://guides/{pre}/img-{i}.png"
        values["guide_image_uuid"] = f"10000000-0000-4000-8000-{i:012d}"
    values.update(kw)
    return LedgerRow(**values)


def run1() -> list[LedgerRow]:
    """Run r1 on 2024-05-01: canny 3 ok + 1 bad image; depth 2 ok + 1 missing model."""
    return [
        *(row("r1", i, "canny", "success") for i in range(3)),
        row("r1", 3, "canny", "error", error_code="invalidImage", error_parameter="inputImage"),
        *(row("r1", i, "depth", "success") for i in range(4, 6)),
        row("r1", 6, "depth", "error", error_code="modelUnavailable", error_message="no weights"),
    ]


def run2() -> list[LedgerRow]:
    """Run r2 on 2024-05-02: canny 3 skipped + 1 ok; depth 2 bad images."""
    return [
        *(row("r2", i, "canny", "skipped") for i in range(3)),
        row("r2", 7, "canny", "success"),
        *(row("r2", i, "depth", "error", error_code="invalidImage") for i in range(8, 10)),
    ]


def write_sample(url: str, **options: Any) -> list[str]:
    writer = LedgerWriter(url, storage_options=options or None)
    return [
        writer.write_shard("r1", 0, run1(), date="2024-05-01"),
        writer.write_shard("r2", 0, run2(), date=dt.date(2024, 5, 2)),
    ]


def sorted_frame(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(["run_id", "shard", "row"]).reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# settings hash


def test_settings_hash_is_canonical_and_does_not_fill_defaults() -> None:
    base = settings_hash("canny", {"width": 512, "lowThresholdCanny": 100})
    assert len(base) == 16 and int(base, 16) >= 0
    # key order, integral floats, numpy scalars and explicit None do not change the work
    assert settings_hash("canny", {"lowThresholdCanny": 100.0, "width": np.int64(512)}) == base
    assert settings_hash("canny", {"width": 512, "lowThresholdCanny": 100, "height": None}) == base
    # anything the user chose that changes the output does
    assert settings_hash("canny", {"width": 512, "lowThresholdCanny": 101}) != base
    assert (
        settings_hash("canny", {"width": 512, "lowThresholdCanny": 100, "outputFormat": "JPG"})
        != base
    )
    assert settings_hash("depth", {"width": 512, "lowThresholdCanny": 100}) != base
    # defaults are not filled in: an explicit default is a different request text
    assert settings_hash("canny", {}) != settings_hash("canny", {"lowThresholdCanny": 100})
    assert ledger.canonical_json({"b": 1, "a": [1.0, True]}) == '{"a":[1,true],"b":1}'


# --------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("kind", ["path", "file_url", "memory"])
def test_round_trip_local_and_memory(kind: str, tmp_path: Path) -> None:
    url = {
        "path": str(tmp_path / "ledger"),
        "file_url": (tmp_path / "ledger").as_uri(),
        "memory": f"memory://ledger-{tmp_path.name}",
    }[kind]
    check_round_trip(url, {})


def test_round_trip_s3(s3_endpoint: str, s3_bucket: str) -> None:
    url = f"{s3_bucket}/runs/ledger"
    check_round_trip(url, s3_options(s3_endpoint))
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **s3_options(s3_endpoint))
    keys = sorted(fs.find(url))
    prefix = url.removeprefix("s3://")
    assert keys == [
        f"{prefix}/date=2024-05-01/run=r1/shard-000000.parquet",
        f"{prefix}/date=2024-05-02/run=r2/shard-000000.parquet",
    ]


def check_round_trip(url: str, options: dict[str, Any]) -> None:
    paths = write_sample(url, **options)
    assert paths == [
        f"{url}/date=2024-05-01/run=r1/shard-000000.parquet",
        f"{url}/date=2024-05-02/run=r2/shard-000000.parquet",
    ]
    expected = sorted_frame(rows_to_table(run1() + run2()).to_pandas())

    # our reader: every column back, typed, plus date/run from the path
    got = sorted_frame(read_ledger(url, storage_options=options))
    pd.testing.assert_frame_equal(got[LEDGER_SCHEMA.names], expected, check_dtype=True)
    assert got["started_at"].iloc[0] == pd.Timestamp(T0).floor("ms")
    assert str(got["started_at"].dtype) == "datetime64[ms, UTC]"
    assert got["attempts"].dtype == np.int32
    assert got.groupby("run")["date"].unique().map(list).to_dict() == {
        "r1": ["2024-05-01"],
        "r2": ["2024-05-02"],
    }

    # a plain pyarrow hive dataset (what duckdb/Spark users do) sees the same rows
    fs, root = fsspec.core.url_to_fs(url, **options)
    plain = ds.dataset(root, filesystem=fs, format="parquet", partitioning="hive")
    table = plain.to_table()
    assert table.num_rows == len(expected)
    assert sorted(set(table["run"].to_pylist())) == ["r1", "r2"]

    # each returned path is one readable parquet file holding exactly that shard
    with fsspec.open(paths[1], "rb", **options) as fh:
        shard = pq.read_table(fh)
    assert shard.schema.equals(LEDGER_SCHEMA, check_metadata=False)
    assert shard.num_rows == len(run2())


def test_rewriting_a_shard_replaces_it(tmp_path: Path) -> None:
    url = str(tmp_path / "ledger")
    writer = LedgerWriter(url)
    writer.write_shard("r1", 0, run1(), date="2024-05-01")
    retried = [row("r1", 0, "canny", "success", attempts=2)]
    writer.write_shard("r1", 0, retried, date="2024-05-01")
    frame = read_ledger(url)
    assert len(frame) == 1 and frame["attempts"].tolist() == [2]
    assert len(list((tmp_path / "ledger").rglob("*"))) == 3  # date dir, run dir, one file


def test_writer_accepts_a_table_and_fills_missing_columns(tmp_path: Path) -> None:
    url = str(tmp_path / "ledger")
    table = pa.table(
        {"run_id": ["r9"] * 2, "shard": [4, 4], "row": [0, 1], "image_id": ["a", "b"]}
        | {"status": ["success", "error"], "cost_usd": [0.5, None]}
    )
    LedgerWriter(url).write_shard("r9", 4, table, date="2024-01-31")
    frame = read_ledger(url)
    assert frame["image_id"].tolist() == ["a", "b"]
    assert frame["preprocessor"].isna().all() and frame["started_at"].isna().all()
    assert frame["run"].tolist() == ["r9", "r9"] and frame["date"].tolist() == ["2024-01-31"] * 2
    assert (tmp_path / "ledger/date=2024-01-31/run=r9/shard-000004.parquet").is_file()


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("r1", 0, [row("r1", 0, "canny", "done")]), ValueError),  # unknown status
        (("r1", 1, [row("r1", 0, "canny", "success")]), ValueError),  # rows of another shard
        (("r2", 0, [row("r1", 0, "canny", "success")]), ValueError),  # rows of another run
        (("../r1", 0, [row("../r1", 0, "canny", "success")]), InvalidParameter),  # path escape
        (("r1", 0, pa.table({"run_id": ["r1"], "bogus": [1]})), ValueError),  # unknown column
        (("r1", 0, pa.table({"run_id": ["r1"], "shard": [0]})), ValueError),  # required is null
    ],
)
def test_writer_refuses_inconsistent_rows(tmp_path: Path, args: tuple, error: type) -> None:
    with pytest.raises(error):
        LedgerWriter(str(tmp_path)).write_shard(*args, date="2024-05-01")
    assert list(tmp_path.iterdir()) == []


def test_bad_date_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidParameter):
        LedgerWriter(str(tmp_path)).write_shard("r1", 0, run1(), date="2024-13-01")
    with pytest.raises(InvalidParameter):
        LedgerWriter(str(tmp_path)).write_shard("r1", 0, run1(), date="01/05/2024")


# --------------------------------------------------------------------------------------------
# atomicity


def test_a_crashed_write_leaves_nothing_readers_see(tmp_path: Path) -> None:
    url = str(tmp_path / "ledger")
    write_sample(url)
    shard_dir = tmp_path / "ledger/date=2024-05-01/run=r1"
    good = (shard_dir / "shard-000000.parquet").read_bytes()
    # what a process killed mid-write leaves: its half-written temp file (never renamed)
    final = f"{shard_dir}/shard-000001.parquet"
    Path(ledger._temp_name(final)).write_bytes(good[: len(good) // 2])
    # a plain pyarrow hive reader (no options) skips our hidden temp file
    plain = ds.dataset(str(tmp_path / "ledger"), format="parquet", partitioning="hive")
    assert plain.count_rows() == len(run1()) + len(run2())
    # our readers also skip debris other tools leave that is not a finished shard
    (shard_dir / "shard-000002.parquet.inprogress").write_bytes(b"junk")
    (shard_dir / "_SUCCESS").write_bytes(b"")
    assert len(list(shard_dir.iterdir())) == 4

    assert len(read_ledger(url)) == len(run1()) + len(run2())
    assert summarize(url)["total"].sum() == len(run1()) + len(run2())
    assert len(DoneIndex.load(url)) == 6


def test_a_failed_rename_leaves_no_target_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(src: str, dst: str) -> None:
        raise OSError("disk went away")

    monkeypatch.setattr(ledger.os, "replace", crash)
    with pytest.raises(OSError, match="disk went away"):
        LedgerWriter(str(tmp_path / "ledger")).write_shard("r1", 0, run1(), date="2024-05-01")
    monkeypatch.undo()
    assert [p for p in (tmp_path / "ledger").rglob("*") if p.is_file()] == []
    assert read_ledger(str(tmp_path / "ledger")).empty


def test_object_stores_get_one_put_of_the_complete_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = fsspec.filesystem("memory")
    puts: list[tuple[str, bytes]] = []
    real = fs.pipe_file

    def spy(path: str, value: bytes, *args: Any, **kw: Any) -> Any:
        puts.append((path, value))
        return real(path, value, *args, **kw)

    monkeypatch.setattr(fs, "pipe_file", spy)
    url = f"memory://one-put-{tmp_path.name}"
    LedgerWriter(url, fs=fs).write_shard("r1", 0, run1(), date="2024-05-01")
    assert len(puts) == 1
    path, data = puts[0]
    assert path.endswith("/date=2024-05-01/run=r1/shard-000000.parquet")
    assert pq.read_table(io.BytesIO(data)).num_rows == len(run1())
    assert fs.find(f"/one-put-{tmp_path.name}") == [path]


# --------------------------------------------------------------------------------------------
# secrets


def test_no_query_strings_or_credentials_are_stored(tmp_path: Path) -> None:
    secret = "X-Amz-Signature=deadbeefcafe"
    rows = [
        row(
            "r1",
            0,
            "canny",
            "success",
            input_uri=f"https://user:hunter2@cdn.example.com/in/0.png?{secret}&X-Amz-Expires=60#frag",
            output_uri=f"https://bucket.s3.amazonaws.com/out/img-0.png?{secret}",
        ),
        row(
            "r1",
            1,
            "canny",
            "error",
            input_uri="data:image/png;base64," + "A" * 5000,
            error_code="inputImageUnavailable",
            error_message=f"GET https://cdn.example.com/in/1.png?{secret} returned 403",
        ),
    ]
    table = rows_to_table(rows[1:]).set_column(
        4, "input_uri", pa.array([f"s3://photos/in/1.png?{secret}"])
    )
    url = str(tmp_path / "ledger")
    writer = LedgerWriter(url)
    writer.write_shard("r1", 0, rows, date="2024-05-01")
    writer.write_shard("r1", 1, table.set_column(1, "shard", pa.array([1])), date="2024-05-01")

    frame = sorted_frame(read_ledger(url))
    text = frame.astype(str).to_string()
    for leaked in ("Signature", "deadbeef", "hunter2", "user:", "Expires", "frag", "AAAA"):
        assert leaked not in text
    assert frame["input_uri"].tolist() == [
        "https://cdn.example.com/in/0.png",
        "data:image/png;base64,<5022 chars omitted>",
        "s3://photos/in/1.png",
    ]
    assert frame["output_uri"].iloc[0] == "https://bucket.s3.amazonaws.com/out/img-0.png"
    assert frame["error_message"].iloc[1] == "GET https://cdn.example.com/in/1.png returned 403"
    # plain local paths pass through untouched
    assert ledger._strip_secrets("/data/photos/a b.png") == "/data/photos/a b.png"


# --------------------------------------------------------------------------------------------
# DoneIndex


def test_done_index_on_100k_keys(tmp_path: Path) -> None:
    n = 100_000
    ids = np.array([f"photo/{i:07d}.jpg" for i in range(n)], dtype=object)
    pres = np.where(np.arange(n) % 2 == 0, "canny", "depth").astype(object)
    hashes = np.array([CANNY, DEPTH], dtype=object)[np.arange(n) % 2]
    url = str(tmp_path / "ledger")
    writer = LedgerWriter(url)
    for shard, start in enumerate(range(0, n, 25_000)):
        part = slice(start, start + 25_000)
        table = pa.table(
            {
                "run_id": ["r1"] * 25_000,
                "shard": [shard] * 25_000,
                "row": np.arange(start, start + 25_000),
                "image_id": ids[part],
                "preprocessor": pres[part],
                "settings_hash": hashes[part],
                "status": ["success"] * 25_000,
                "cost_usd": np.full(25_000, 0.001),
            }
        )
        writer.write_shard("r1", shard, table, date="2024-05-01")
    # failures and skips of other images must not count as done
    failed = [row("r2", 10**6 + i, "canny", "error", error_code="invalidImage") for i in range(50)]
    skipped = [row("r2", 10**6 + 50 + i, "depth", "skipped") for i in range(50)]
    writer.write_shard("r2", 0, failed + skipped, date="2024-05-02")

    index = DoneIndex.load(url, batch_size=10_000)
    assert len(index) == n
    assert index.nbytes == 8 * n
    assert index.already_spent() == pytest.approx(n * 0.001)

    present = pd.DataFrame({"image_id": ids, "preprocessor": pres, "settings_hash": hashes})
    assert index.contains(present).all()
    other_pre = present.assign(preprocessor=np.where(pres == "canny", "depth", "canny"))
    other_settings = present.assign(settings_hash="0123456789abcdef")
    new_ids = present.assign(image_id=[f"photo/{i:07d}.png" for i in range(n)])
    for absent in (other_pre, other_settings, new_ids):
        assert not index.contains(absent).any()
    assert not index.contains([(r.image_id, r.preprocessor, r.settings_hash) for r in failed]).any()
    assert not index.contains(
        [(r.image_id, r.preprocessor, r.settings_hash) for r in skipped]
    ).any()

    # 400k distinct keys hash to 400k distinct values: no collision at this scale
    everything = pd.concat([present, other_pre, other_settings, new_ids])
    all_hashes = key_hashes(*(everything[c] for c in ledger.KEY_COLUMNS))
    assert np.unique(all_hashes).size == 4 * n
    # contains accepts precomputed hashes; the order of the answer follows the query
    assert index.contains(all_hashes).tolist() == [True] * n + [False] * (3 * n)


def test_done_index_small_api(tmp_path: Path) -> None:
    url = str(tmp_path / "ledger")
    empty = DoneIndex.load(url)
    assert len(empty) == 0 and empty.already_spent() == 0.0
    assert empty.contains([("img-0", "canny", CANNY)]).tolist() == [False]

    write_sample(url)
    index = DoneIndex.load(url)
    # successes: canny img-0..2 and img-7, depth img-4..5
    assert len(index) == 6
    assert index.already_spent() == pytest.approx(4 * 0.0006 + 2 * 0.0013)
    assert ("img-7", "canny", CANNY) in index
    assert ("img-3", "canny", CANNY) not in index  # an error
    assert ("img-0", "canny", DEPTH) not in index  # other settings
    assert index.contains([]).shape == (0,)
    index.add([("img-3", "canny", CANNY)])
    assert ("img-3", "canny", CANNY) in index and len(index) == 7


def test_duplicate_successes(tmp_path: Path) -> None:
    url = str(tmp_path / "ledger")
    write_sample(url)
    assert duplicate_successes(url).empty
    LedgerWriter(url).write_shard("r3", 0, [row("r3", 1, "canny", "success")], date="2024-05-03")
    dups = duplicate_successes(url)
    assert dups.to_dict("records") == [
        {"image_id": "img-1", "preprocessor": "canny", "settings_hash": CANNY, "count": 2}
    ]


# --------------------------------------------------------------------------------------------
# summaries


def test_summary_by_preprocessor_day_and_run(tmp_path: Path) -> None:
    url = str(tmp_path / "ledger")
    write_sample(url)

    by_pre = summarize(url, "preprocessor")
    assert list(by_pre.columns) == list(ledger.SUMMARY_COLUMNS)
    assert by_pre.index.name == "preprocessor"
    counts = by_pre[["success", "error", "skipped", "total"]].to_dict("index")
    assert counts == {
        "canny": {"success": 4, "error": 1, "skipped": 3, "total": 8},
        "depth": {"success": 2, "error": 3, "skipped": 0, "total": 5},
    }
    assert by_pre.loc["canny", "cost_usd"] == pytest.approx(4 * 0.0006)
    assert by_pre.loc["depth", "cost_usd"] == pytest.approx(2 * 0.0013)
    assert by_pre.loc["canny", "errors_by_code"] == {"invalidImage": 1}
    assert by_pre.loc["depth", "errors_by_code"] == {"invalidImage": 2, "modelUnavailable": 1}

    by_day = summarize(url, "day")
    assert list(by_day.index) == ["2024-05-01", "2024-05-02"]
    assert by_day["total"].tolist() == [7, 6] and by_day["skipped"].tolist() == [0, 3]
    assert by_day.loc["2024-05-02", "errors_by_code"] == {"invalidImage": 2}

    by_run = summarize(url, "run", batch_size=2)  # aggregation across many small batches
    assert list(by_run.index) == ["r1", "r2"]
    assert by_run["success"].tolist() == [5, 1]
    assert by_run["cost_usd"].tolist() == pytest.approx([3 * 0.0006 + 2 * 0.0013, 0.0006])

    totals = summary_totals(by_pre)
    assert totals == {
        "success": 6,
        "error": 4,
        "skipped": 3,
        "total": 13,
        "cost_usd": pytest.approx(4 * 0.0006 + 2 * 0.0013),
        "errors_by_code": {"invalidImage": 3, "modelUnavailable": 1},
    }


def test_summary_of_an_empty_ledger_and_bad_grouping(tmp_path: Path) -> None:
    empty = summarize(str(tmp_path / "nothing-here"))
    assert empty.empty and list(empty.columns) == list(ledger.SUMMARY_COLUMNS)
    with pytest.raises(InvalidParameter):
        summarize(str(tmp_path), by="week")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# CLI

runner = CliRunner()


def table_rows(output: str) -> dict[str, list[str]]:
    """The body rows of a rich table, keyed by first cell."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("│┃").split("│")]
        if len(cells) == 7 and cells[0]:
            rows[cells[0]] = cells[1:]
    return rows


def test_cli_ledger_summary(tmp_path: Path) -> None:
    url = str(tmp_path / "ledger")
    write_sample(url)
    result = runner.invoke(app, ["ledger", "summary", url], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = table_rows(result.output)
    assert rows["canny"] == ["4", "1", "3", "8", "0.0024", "invalidImage: 1"]
    assert rows["depth"] == ["2", "3", "0", "5", "0.0026", "invalidImage: 2, modelUnavailable: 1"]
    assert rows["total"] == ["6", "4", "3", "13", "0.0050", "invalidImage: 3, modelUnavailable: 1"]

    result = runner.invoke(app, ["ledger", "summary", url, "--by", "day"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = table_rows(result.output)
    assert rows["2024-05-01"][:4] == ["5", "2", "0", "7"]
    assert rows["2024-05-02"][:4] == ["1", "2", "3", "6"]
    assert rows["total"][3] == "13"


def test_cli_ledger_summary_errors(tmp_path: Path) -> None:
    missing = runner.invoke(app, ["ledger", "summary", str(tmp_path / "nope")])
    assert missing.exit_code == 1
    assert "no ledger rows" in missing.output
    url = str(tmp_path / "ledger")
    write_sample(url)
    bad = runner.invoke(app, ["ledger", "summary", url, "--by", "week"])
    assert bad.exit_code == 2
    assert "invalidParameter" in bad.output


def test_cli_ledger_summary_on_s3_uses_the_environment(
    s3_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"{s3_bucket}/ledger"
    write_sample(url, **s3_options(s3_endpoint))
    assert DoneIndex.load(url, storage_options=s3_options(s3_endpoint)).already_spent() > 0
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)  # credentials: set by the s3 fixture
    result = runner.invoke(app, ["ledger", "summary", url, "--by", "run"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = table_rows(result.output)
    assert rows["r1"][:4] == ["5", "2", "0", "7"] and rows["r2"][:4] == ["1", "2", "3", "6"]
