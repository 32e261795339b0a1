"""End to end: the ``preprocess_manifest`` flow under Prefect's real engine, with real parts.

Everything here is real: an ephemeral Prefect API (one ``prefect_test_harness`` for the
session), a moto S3 server on 127.0.0.1 (``tests/s3.py``) holding manifests, inputs, outputs
and the ledger, the embedded engine, and the real photos of ../shared/testdata/images
(downscaled to at most 256 px so the module stays fast). Only classical preprocessors
(canny, shuffle) run, so no model weights are needed; depth appears only in a dry run.

Shards are small (2-3 rows) so every run has several shards and ``max_shards_in_flight``
bounds real concurrency.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from connectors import ledger as ledger_mod
from engine.api import Engine
from flows import preprocess as pipeline
from flows.preprocess import DryRunReport, RunSummary, build_config, dry_run, flow_for
from tasks import shard as shard_mod
from tests.conftest import thumbnails

pytestmark = pytest.mark.timeout(300)

CANNY = 0.0006  # default price of a canny-class guide image (guideflow.pricing)
DEPTH = 0.0013  # default price of a depth-class guide image
PHOTOS = ("room", "human", "building", "toy", "bird", "dog2")
THUMB = 256


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefect_api(prefect_harness: None) -> Iterator[None]:
    """The session's ephemeral Prefect API (tests/prefect_harness.py)."""
    yield


@pytest.fixture(scope="module")
def s3(s3_endpoint: str) -> Iterator[Any]:
    """A sync s3fs on the moto server; the pipeline finds the server via GUIDEFLOW_S3_ENDPOINT.

    Only the environment variable points the pipeline at moto (no storage_options are
    passed anywhere), so manifests, inputs, outputs and the ledger all go through
    ``connectors.storage.url_to_fs``.
    """
    import s3fs

    from tests.s3 import s3_options

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GUIDEFLOW_S3_ENDPOINT", s3_endpoint)
        yield s3fs.S3FileSystem(skip_instance_cache=True, **s3_options(s3_endpoint))


@pytest.fixture(scope="module")
def photos(images_dir: Path) -> dict[str, bytes]:
    """Real photos as PNG, downscaled to at most THUMB px (RGBA kept, like the originals)."""
    return thumbnails(PHOTOS, THUMB)


@pytest.fixture()
def bucket(s3: Any, s3_bucket: str, prefect_api: None) -> str:
    """A fresh bucket (``s3://name``) with the pipeline pointed at moto and Prefect running."""
    return s3_bucket


# -- helpers -------------------------------------------------------------------------------


def put(s3: Any, url: str, data: bytes) -> str:
    s3.pipe(url.removeprefix("s3://"), data)
    return url


def upload_photos(s3: Any, bucket: str, photos: dict[str, bytes], names=PHOTOS) -> dict[str, str]:
    """Upload photos to ``<bucket>/in/<name>.png``; return name → URL."""
    return {n: put(s3, f"{bucket}/in/{n}.png", photos[n]) for n in names}


def csv_bytes(rows: list[dict[str, Any]]) -> bytes:
    return pd.DataFrame(rows).to_csv(index=False).encode()


def run_flow(**params: Any) -> Any:
    """Run the flow the way the CLI does; return its final state."""
    params.setdefault("max_shards_in_flight", 2)
    params.setdefault("concurrency", 4)
    config_params = dict(params)
    config_params["dry_run"] = config_params.pop("dry_run_only", False)
    config = build_config(**config_params)
    return asyncio.run(flow_for(config)(**params, return_state=True))


def result_of(state: Any) -> Any:
    result = state.result(raise_on_failure=False)
    if asyncio.iscoroutine(result):
        result = asyncio.run(result)
    return result


def summary_of(state: Any) -> RunSummary:
    result = result_of(state)
    assert isinstance(result, RunSummary), (state, result)
    return result


def read_ledger(url: str) -> pd.DataFrame:
    return ledger_mod.read_ledger(url)


def ledger_files(s3: Any, ledger: str) -> list[str]:
    root = ledger.removeprefix("s3://")
    if not s3.exists(root):
        return []
    s3.invalidate_cache()
    return sorted(p for p in s3.find(root) if p.endswith(".parquet"))


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def size_of(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as im:
        return im.size


def _none(value: Any) -> Any:
    return None if pd.isna(value) else value


def assert_no_duplicate_successes(ledger: str) -> None:
    dups = ledger_mod.duplicate_successes(ledger)
    assert dups.empty, dups


# -- 1. end to end -------------------------------------------------------------------------


def test_end_to_end_local_backend_s3_everything(
    s3: Any, bucket: str, photos: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Manifest, inputs, outputs and ledger in S3; two preprocessors per image.

    One row is an http presigned GET URL of an input (fetched through the SSRF guard,
    which is told to allow the moto server): its signature must never reach the ledger.
    """
    from connectors.storage import presign_get

    monkeypatch.setenv("GUIDEFLOW_NET_ALLOW", "127.0.0.1")
    names = ["room", "human", "building", "toy"]
    inputs = upload_photos(s3, bucket, photos, names)
    presigned = asyncio.run(presign_get(inputs["toy"], expires=600))
    assert "X-Amz-Signature=" in presigned
    rows = [{"id": n, "image": inputs[n]} for n in names[:3]]
    rows.append({"id": "toy", "image": presigned})
    manifest = put(s3, f"{bucket}/manifests/batch.csv", csv_bytes(rows))
    output, ledger = f"{bucket}/out", f"{bucket}/ledger"

    state = run_flow(
        manifest=manifest,
        preprocessors=["canny", "shuffle"],
        output=output,
        ledger=ledger,
        shard_size=3,
    )

    assert state.is_completed() and state.name == "Completed", state
    summary = summary_of(state)
    assert (summary.rows, summary.shards, summary.success, summary.errors) == (4, 2, 8, 0)
    assert summary.cost_usd == pytest.approx(8 * CANNY)
    assert summary.cost_by_preprocessor == pytest.approx({"canny": 4 * CANNY, "shuffle": 4 * CANNY})

    engine = Engine()
    for name in names:
        source = photos[name]
        for proc in ("canny", "shuffle"):
            key = f"{output}/{proc}/{name}.png".removeprefix("s3://")
            data = s3.cat(key)
            assert data[:8] == b"\x89PNG\r\n\x1a\n", key
            assert size_of(data) == size_of(source), key
            assert decode(data).std() > 0, f"{key} is blank"
            assert s3.info(key).get("ContentType") == "image/png"
        expected = engine.preprocess(source, "canny", output_format="PNG").data
        assert s3.cat(f"{output}/canny/{name}.png".removeprefix("s3://")) == expected

    frame = read_ledger(ledger)
    assert len(frame) == 8
    assert set(frame["status"]) == {"success"}
    assert frame.groupby(["image_id", "preprocessor"]).size().eq(1).all()
    assert sorted(zip(frame["image_id"], frame["preprocessor"], strict=True)) == sorted(
        (n, p) for n in names for p in ("canny", "shuffle")
    )
    assert frame["cost_usd"].to_numpy() == pytest.approx([CANNY] * 8)
    assert frame["cost_usd"].sum() == pytest.approx(summary.cost_usd)
    assert (frame["backend"] == "local").all()
    assert (frame["attempts"] >= 1).all()
    assert (frame["latency_ms"] > 0).all()
    assert (frame["started_at"] <= frame["finished_at"]).all()
    assert frame["settings_hash"].str.fullmatch(r"[0-9a-f]{16}").all()
    assert frame["task_uuid"].str.len().eq(36).all()
    assert frame["variant"].ne("").all()
    assert (frame["run_id"] == summary.run_id).all()
    assert (frame["run"] == summary.run_id).all()
    pairs = zip(frame["image_id"], frame["preprocessor"], strict=True)
    assert frame["output_uri"].tolist() == [f"{output}/{p}/{i}.png" for i, p in pairs]
    toy = frame[frame["image_id"] == "toy"]["input_uri"].unique().tolist()
    assert toy == [presigned.split("?")[0]]  # the URL without its query string

    files = ledger_files(s3, ledger)
    assert len(files) == 2  # one file per shard
    for path in files:
        assert "/run=" + summary.run_id + "/" in path
        blob = s3.cat(path)
        assert b"X-Amz-Signature" not in blob and b"X-Amz-Credential" not in blob
    assert_no_duplicate_successes(ledger)


# -- 2. bad rows and bad images ------------------------------------------------------------


def test_bad_rows_and_bad_images_get_one_error_row_each(
    s3: Any, bucket: str, photos: dict[str, bytes]
) -> None:
    inputs = upload_photos(s3, bucket, photos, ["room", "human", "building"])
    truncated = put(s3, f"{bucket}/in/truncated.png", photos["bird"][: len(photos["bird"]) // 2])
    text = put(s3, f"{bucket}/in/notes.jpg", b"this is not a picture\nat all\n" * 20)
    rows = [
        {"id": "good1", "image": inputs["room"], "preprocessor": "", "width": ""},
        {"id": "empty", "image": "", "preprocessor": "", "width": ""},
        {"id": "unknown", "image": inputs["human"], "preprocessor": "bogus", "width": ""},
        {"id": "badwidth", "image": inputs["human"], "preprocessor": "", "width": "abc"},
        {"id": "missing", "image": f"{bucket}/in/nope.png", "preprocessor": "", "width": ""},
        {"id": "truncated", "image": truncated, "preprocessor": "", "width": ""},
        {"id": "text", "image": text, "preprocessor": "", "width": ""},
        {"id": "nobucket", "image": "s3://no-such-bucket-guideflow/a.png", "preprocessor": ""},
        {"id": "scheme", "image": "nosuchproto://host/a.png", "preprocessor": "", "width": ""},
        {"id": "good2", "image": inputs["building"], "preprocessor": "canny", "width": "128"},
        {"id": "huge", "image": inputs["building"], "preprocessor": "", "width": "99999"},
    ]
    manifest = put(s3, f"{bucket}/m.csv", csv_bytes(rows))
    ledger = f"{bucket}/ledger"

    state = run_flow(
        manifest=manifest,
        preprocessors=["canny"],
        output=f"{bucket}/out",
        ledger=ledger,
        shard_size=3,
    )

    summary = summary_of(state)
    assert state.is_completed(), state  # bad rows never fail a run that has good ones
    assert (summary.rows, summary.success, summary.errors) == (11, 2, 9)
    frame = read_ledger(ledger)
    assert len(frame) == 11  # exactly one ledger row per manifest row here
    by_id = frame.set_index("image_id")
    assert by_id.index.is_unique
    expected = {
        "good1": ("success", None, None),
        "good2": ("success", None, None),
        "empty": ("error", "invalidParameter", "image"),
        "unknown": ("error", "invalidPreProcessorType", "preProcessorType"),
        "badwidth": ("error", "invalidParameter", "width"),
        "missing": ("error", "objectNotFound", "inputImage"),
        "nobucket": ("error", "objectNotFound", "inputImage"),
        "truncated": ("error", "invalidImage", "inputImage"),
        "text": ("error", "unsupportedImageFormat", "inputImage"),
        "scheme": ("error", "unsupportedURLScheme", "inputImage"),
        "huge": ("error", "invalidParameter", "width"),
    }
    got = {
        i: (r["status"], _none(r["error_code"]), _none(r["error_parameter"]))
        for i, r in by_id.iterrows()
    }
    assert got == expected
    assert summary.errors_by_code == {
        "invalidParameter": 3,
        "invalidPreProcessorType": 1,
        "objectNotFound": 2,
        "invalidImage": 1,
        "unsupportedImageFormat": 1,
        "unsupportedURLScheme": 1,
    }
    errors = frame[frame["status"] == "error"]
    assert (errors["cost_usd"] == 0).all() and errors["error_message"].str.len().gt(0).all()
    assert frame.loc[frame["status"] == "success", "cost_usd"].tolist() == [CANNY, CANNY]
    good2 = s3.cat(f"{bucket}/out/canny/good2.png".removeprefix("s3://"))
    assert size_of(good2)[0] == 128  # the row's width column was applied
    outputs = sorted(
        p.rsplit("/", 1)[1] for p in s3.find(f"{bucket}/out/canny".removeprefix("s3://"))
    )
    assert outputs == ["good1.png", "good2.png"]
    assert_no_duplicate_successes(ledger)


def test_repeated_work_in_a_manifest_is_done_once_even_across_shards(
    s3: Any, bucket: str, photos: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same (id, preprocessor, settings) in several rows, in one shard and in two
    shards running at once: one success, the other rows are ``skipped`` duplicates.

    A barrier after each shard has claimed its work (``tasks.shard._claim``) makes the
    two shards really overlap: otherwise the second could start after the first had
    finished and simply find the key in the done index.
    """
    real_claim = shard_mod._claim
    both_claimed = threading.Barrier(2)

    def claim(*args: Any, **kwargs: Any) -> Any:
        out = real_claim(*args, **kwargs)
        both_claimed.wait(60)  # blocks only this shard's own thread and event loop
        return out

    monkeypatch.setattr(shard_mod, "_claim", claim)
    monkeypatch.setattr(pipeline, "process_shard", shard_mod.process_shard.with_options(retries=0))
    inputs = upload_photos(s3, bucket, photos, ["room", "human"])
    rows = [
        {"id": "room", "image": inputs["room"]},
        {"id": "room", "image": inputs["room"]},  # same shard
        {"id": "human", "image": inputs["human"]},
        {"id": "room", "image": inputs["room"]},  # next shard, in flight at the same time
    ]
    manifest = put(s3, f"{bucket}/m.csv", csv_bytes(rows))
    ledger = f"{bucket}/ledger"

    summary = summary_of(
        run_flow(
            manifest=manifest,
            preprocessors=["canny"],
            output=f"{bucket}/out",
            ledger=ledger,
            shard_size=2,
        )
    )

    assert (summary.success, summary.skipped, summary.errors) == (2, 2, 0)
    assert summary.cost_usd == pytest.approx(2 * CANNY)
    frame = read_ledger(ledger)
    assert sorted(frame.loc[frame["status"] == "success", "image_id"]) == ["human", "room"]
    skipped = frame[frame["status"] == "skipped"]
    assert set(skipped["error_code"]) == {"duplicateRow"} and (skipped["cost_usd"] == 0).all()
    # row 1 repeats row 0 in its shard; whichever shard claimed "room" first made it
    assert sorted(skipped["row"]) in ([0, 1], [1, 3])
    assert_no_duplicate_successes(ledger)


# -- 3. resume -----------------------------------------------------------------------------


def test_rerun_does_nothing_and_force_redoes(
    s3: Any, bucket: str, photos: dict[str, bytes]
) -> None:
    names = ["room", "human", "building", "toy", "bird"]
    inputs = upload_photos(s3, bucket, photos, names)
    manifest = put(s3, f"{bucket}/m.csv", csv_bytes([{"image": inputs[n]} for n in names]))
    output, ledger = f"{bucket}/out", f"{bucket}/ledger"
    params = dict(
        manifest=manifest, preprocessors=["canny"], output=output, ledger=ledger, shard_size=2
    )

    first = summary_of(run_flow(**params))
    assert (first.success, first.already_done) == (5, 0)
    keys = sorted(s3.find(f"{output}/canny".removeprefix("s3://")))
    assert len(keys) == 5  # ids are sha256(uri)[:16] (no id column)
    # Replace every output with a sentinel: a re-run that rewrote anything would show.
    for key in keys:
        s3.pipe(key, b"sentinel")
    files_before = ledger_files(s3, ledger)

    second_state = run_flow(**params)
    second = summary_of(second_state)
    assert second_state.is_completed()
    assert (second.success, second.errors, second.already_done) == (0, 0, 5)
    assert second.cost_usd == 0.0
    assert all(s3.cat(k) == b"sentinel" for k in keys)
    assert ledger_files(s3, ledger) == files_before  # no new ledger rows at all
    assert_no_duplicate_successes(ledger)
    assert ledger_mod.summarize(ledger)["cost_usd"].sum() == pytest.approx(5 * CANNY)

    forced = summary_of(run_flow(**params, force=True))
    assert (forced.success, forced.already_done) == (5, 0)
    assert forced.cost_usd == pytest.approx(5 * CANNY)
    assert all(s3.cat(k)[:8] == b"\x89PNG\r\n\x1a\n" for k in keys)
    frame = read_ledger(ledger)
    # force adds a second success per key, in a second run partition
    assert frame.groupby(["image_id", "preprocessor"]).size().eq(2).all()
    assert frame["run"].nunique() == 2


# -- 4. crash and resume -------------------------------------------------------------------


def _fail_shard(monkeypatch: pytest.MonkeyPatch, index: int, times: int) -> list[int]:
    """Make the ledger write of shard ``index`` raise ``times`` times; return the call log."""
    real = shard_mod.LedgerWriter.write_shard
    calls: list[int] = []

    def write_shard(self: Any, run_id: str, shard_index: int, *args: Any, **kw: Any) -> str:
        calls.append(shard_index)
        if shard_index == index and calls.count(index) <= times:
            raise OSError(f"simulated crash writing shard {index}")
        return real(self, run_id, shard_index, *args, **kw)

    monkeypatch.setattr(shard_mod.LedgerWriter, "write_shard", write_shard)
    return calls


def test_a_crashed_shard_is_redone_by_the_next_run_without_duplicates(
    s3: Any, bucket: str, photos: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    names = list(PHOTOS)
    inputs = upload_photos(s3, bucket, photos, names)
    rows = [{"id": n, "image": inputs[n]} for n in names]
    manifest = put(s3, f"{bucket}/m.csv", csv_bytes(rows))
    ledger = f"{bucket}/ledger"
    params = dict(
        manifest=manifest,
        preprocessors=["canny"],
        output=f"{bucket}/out",
        ledger=ledger,
        shard_size=2,
        max_shards_in_flight=1,
    )
    monkeypatch.setattr(pipeline, "process_shard", shard_mod.process_shard.with_options(retries=0))
    calls = _fail_shard(monkeypatch, index=1, times=1)

    crashed = run_flow(**params)

    assert crashed.is_failed(), crashed
    with pytest.raises(OSError, match="simulated crash writing shard 1"):
        crashed.result()
    assert calls == [0, 1]  # one shard at a time: shard 2 was never started
    done = read_ledger(ledger)
    assert sorted(done["image_id"]) == ["human", "room"]  # only shard 0 is recorded

    resumed_state = run_flow(**params)
    resumed = summary_of(resumed_state)
    assert resumed_state.is_completed()
    assert (resumed.success, resumed.already_done, resumed.errors) == (4, 2, 0)
    frame = read_ledger(ledger)
    assert sorted(frame.loc[frame["status"] == "success", "image_id"]) == sorted(names)
    assert_no_duplicate_successes(ledger)
    assert frame["cost_usd"].sum() == pytest.approx(len(names) * CANNY)


def test_a_shard_retried_by_prefect_is_recorded_once(
    s3: Any, bucket: str, photos: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prefect's task retry redoes the whole shard; the ledger still gets it once."""
    names = ["room", "human", "building", "toy"]
    inputs = upload_photos(s3, bucket, photos, names)
    manifest = put(s3, f"{bucket}/m.csv", csv_bytes([{"id": n, "image": inputs[n]} for n in names]))
    ledger = f"{bucket}/ledger"
    monkeypatch.setattr(
        pipeline,
        "process_shard",
        shard_mod.process_shard.with_options(retries=1, retry_delay_seconds=0),
    )
    calls = _fail_shard(monkeypatch, index=0, times=1)

    state = run_flow(
        manifest=manifest,
        preprocessors=["canny"],
        output=f"{bucket}/out",
        ledger=ledger,
        shard_size=2,
    )

    summary = summary_of(state)
    assert state.is_completed(), state
    assert sorted(calls) == [0, 0, 1]
    assert (summary.success, summary.errors) == (4, 0)
    assert summary.cost_usd == pytest.approx(4 * CANNY)
    assert len(ledger_files(s3, ledger)) == 2
    assert len(read_ledger(ledger)) == 4
    assert_no_duplicate_successes(ledger)


def test_a_worker_process_does_not_reuse_a_previous_runs_done_index(
    s3: Any, bucket: str, photos: dict[str, bytes]
) -> None:
    """Shards of two runs in one long-lived process (a Dask worker): the second run must
    see the first run's successes, not the done-index snapshot taken before them."""
    from connectors.manifest import plan_shards

    inputs = upload_photos(s3, bucket, photos, ["room", "human"])
    manifest = put(s3, f"{bucket}/m.csv", csv_bytes([{"image": u} for u in inputs.values()]))
    config = build_config(
        manifest=manifest,
        preprocessors=["canny"],
        output=f"{bucket}/out",
        ledger=f"{bucket}/ledger",
    )
    (shard,) = plan_shards(config.manifest, 10)
    first = asyncio.run(shard_mod.run_shard(shard, config, "run-a"))
    second = asyncio.run(shard_mod.run_shard(shard, config, "run-b"))
    assert (first.success, second.success, second.already_done) == (2, 0, 2)
    assert_no_duplicate_successes(config.ledger)


# -- 5. budget -----------------------------------------------------------------------------


def test_budget_stops_the_run_and_a_rerun_finishes_the_rest(
    s3: Any, bucket: str, photos: dict[str, bytes]
) -> None:
    inputs = upload_photos(s3, bucket, photos)
    rows = [{"id": f"img{i:02d}", "image": inputs[PHOTOS[i % len(PHOTOS)]]} for i in range(12)]
    manifest = put(s3, f"{bucket}/m.csv", csv_bytes(rows))
    ledger = f"{bucket}/ledger"
    max_cost = 5 * CANNY + 0.0001  # room for 5 canny images, not 6
    params = dict(
        manifest=manifest,
        preprocessors=["canny"],
        output=f"{bucket}/out",
        ledger=ledger,
        shard_size=3,
    )

    state = run_flow(**params, max_cost=max_cost)

    assert state.is_completed() and state.name == "BudgetReached", state
    assert "budget" in (state.message or "") and f"{max_cost:.4f}" in state.message
    summary = summary_of(state)
    assert summary.budget_exhausted
    assert 3 <= summary.success <= 5
    assert summary.cost_usd <= max_cost
    frame = read_ledger(ledger)
    successes = frame[frame["status"] == "success"]
    assert len(successes) == summary.success
    assert successes["cost_usd"].sum() <= max_cost
    assert set(frame["status"]) == {"success"}  # work not started is not recorded

    rest = summary_of(run_flow(**params))
    assert rest.success == 12 - summary.success and rest.already_done == summary.success
    frame = read_ledger(ledger)
    assert sorted(frame["image_id"]) == sorted(r["id"] for r in rows)
    assert_no_duplicate_successes(ledger)


# -- 6. dry run ----------------------------------------------------------------------------


def test_dry_run_counts_what_is_left_and_writes_nothing(
    s3: Any, bucket: str, photos: dict[str, bytes]
) -> None:
    names = ["room", "human", "building", "toy"]
    inputs = upload_photos(s3, bucket, photos, names)
    rows = [{"id": n, "image": inputs[n], "width": ""} for n in names]
    output, ledger = f"{bucket}/out", f"{bucket}/ledger"
    # canny is already done for two of the images
    done = put(s3, f"{bucket}/done.csv", csv_bytes(rows[:2]))
    summary_of(run_flow(manifest=done, preprocessors=["canny"], output=output, ledger=ledger))
    rows.append({"id": "bad", "image": inputs["room"], "width": "abc"})
    manifest = put(s3, f"{bucket}/m.csv", csv_bytes(rows))
    before = sorted(s3.find(bucket.removeprefix("s3://")))
    config = build_config(
        manifest=manifest,
        preprocessors=["canny", "depth"],
        output=output,
        ledger=ledger,
        shard_size=2,
    )

    report = dry_run(config)

    assert report == DryRunReport(
        rows=5,
        shards=3,
        work_items=8,  # 4 valid rows × 2 preprocessors
        already_done=2,
        invalid_rows=1,
        to_do_by_preprocessor={"canny": 2, "depth": 4},
        estimated_cost_usd=pytest.approx(2 * CANNY + 4 * DEPTH),
    )
    forced = dry_run(config.with_(force=True))
    assert forced.already_done == 0 and forced.to_do_by_preprocessor == {"canny": 4, "depth": 4}
    # through the flow as well (what deployments call)
    state = run_flow(
        manifest=manifest,
        preprocessors=["canny", "depth"],
        output=output,
        ledger=ledger,
        shard_size=2,
        dry_run_only=True,
    )
    assert result_of(state) == report
    s3.invalidate_cache()
    assert sorted(s3.find(bucket.removeprefix("s3://"))) == before


# -- 7. manifest formats -------------------------------------------------------------------


def test_parquet_and_jsonl_manifests_in_s3(s3: Any, bucket: str, photos: dict[str, bytes]) -> None:
    inputs = upload_photos(s3, bucket, photos, ["room", "human", "building"])
    table = pa.table(
        {
            "id": ["p-room", "p-human", "p-building"],
            "image": list(inputs.values()),
            "width": pa.array([None, 128, None], pa.int64()),
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=2)
    parquet = put(s3, f"{bucket}/m.parquet", buf.getvalue())
    lines = [
        {"id": "j-room", "image": inputs["room"], "settings": {"lowThresholdCanny": 50}},
        {"id": "j-human", "image": inputs["human"]},
    ]
    jsonl = put(s3, f"{bucket}/m.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode())
    output, ledger = f"{bucket}/out", f"{bucket}/ledger"

    for manifest, expected in ((parquet, 3), (jsonl, 2)):
        state = run_flow(
            manifest=manifest, preprocessors=["canny"], output=output, ledger=ledger, shard_size=2
        )
        summary = summary_of(state)
        assert state.is_completed() and (summary.success, summary.errors) == (expected, 0)

    frame = read_ledger(ledger).set_index("image_id")
    assert sorted(frame.index) == sorted(["p-room", "p-human", "p-building", "j-room", "j-human"])
    assert size_of(s3.cat(f"{output}/canny/p-human.png".removeprefix("s3://")))[0] == 128
    assert json.loads(frame.loc["j-room", "settings_json"]) == {"lowThresholdCanny": 50}
    low = s3.cat(f"{output}/canny/j-room.png".removeprefix("s3://"))
    default = s3.cat(f"{output}/canny/p-room.png".removeprefix("s3://"))
    assert decode(low).astype(bool).sum() > decode(default).astype(bool).sum()  # more edges


def test_a_manifest_that_is_not_csv_fails_the_flow_with_invalid_manifest(
    s3: Any, bucket: str
) -> None:
    from connectors.manifest import ManifestError

    garbage = bytes(range(256)) * 8
    manifest = put(s3, f"{bucket}/m.csv", garbage)
    ledger = f"{bucket}/ledger"

    state = run_flow(
        manifest=manifest, preprocessors=["canny"], output=f"{bucket}/out", ledger=ledger
    )

    assert state.is_failed(), state
    error = result_of(state)
    assert isinstance(error, ManifestError) and error.code == "invalidManifest", error
    assert "m.csv" in str(error)
    assert ledger_files(s3, ledger) == []
    assert not s3.exists(f"{bucket}/out".removeprefix("s3://"))


# -- 8. artifacts --------------------------------------------------------------------------


async def _artifacts(flow_run_id: str) -> list[Any]:
    """Every artifact of one flow run, from the Prefect API.

    Posted by hand: Prefect 3.8's ``read_artifacts`` sends ``null`` for omitted filters,
    which its server rejects (422), and passing empty flow-run and task-run filters
    joins on task runs, which hides flow-level artifacts.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import Artifact

    async with get_client() as client:
        response = await client.request(
            "POST",
            "/artifacts/filter",
            json={"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 50},
        )
        response.raise_for_status()
        return Artifact.model_validate_list(response.json())


def test_run_publishes_progress_summary_and_contact_sheet(
    s3: Any, bucket: str, photos: dict[str, bytes]
) -> None:
    names = ["room", "human", "building"]
    inputs = upload_photos(s3, bucket, photos, names)
    manifest = put(s3, f"{bucket}/m.csv", csv_bytes([{"id": n, "image": inputs[n]} for n in names]))
    output = f"{bucket}/out"

    state = run_flow(
        manifest=manifest,
        preprocessors=["canny", "shuffle"],
        output=output,
        ledger=f"{bucket}/ledger",
        shard_size=2,
    )

    summary = summary_of(state)
    artifacts = asyncio.run(_artifacts(str(state.state_details.flow_run_id)))
    by_type: dict[str, list[Any]] = {}
    for artifact in artifacts:
        by_type.setdefault(artifact.type, []).append(artifact)
    assert set(by_type) == {"progress", "table", "markdown"}, by_type

    (progress,) = by_type["progress"]
    assert float(progress.data) == 100.0  # a finished run says so
    assert "6 guide images" in (progress.description or "")

    (table,) = by_type["table"]
    assert table.key == "guideflow-summary"
    data = table.data if isinstance(table.data, list) else json.loads(table.data)
    metrics = {row["metric"]: row["value"] for row in data}
    assert metrics["guide images made"] == 6 and metrics["errors"] == 0
    assert metrics["cost_usd"] == pytest.approx(6 * CANNY)
    assert metrics["cost shuffle"] == pytest.approx(3 * CANNY)

    (markdown,) = by_type["markdown"]
    sheet = f"{output}/_contact_sheets/{summary.run_id}.png"
    assert summary.contact_sheet == sheet
    assert f"]({sheet})" in markdown.data
    png = s3.cat(sheet.removeprefix("s3://"))
    rgb = decode(png)
    samples = min(len(summary.samples), 8)
    assert samples == 6
    assert rgb.shape[0] == samples * 160 + (samples - 1) * 6  # one row per sample
    assert rgb.std() > 0


# -- 9. CLI --------------------------------------------------------------------------------


def test_cli_run_dry_run_rerun_and_bad_row(
    tmp_path: Path, photos: dict[str, bytes], prefect_api: None
) -> None:
    from guideflow.cli import app

    runner = CliRunner()
    images = tmp_path / "images"
    images.mkdir()
    for name in ("room", "human", "toy"):
        (images / f"{name}.png").write_bytes(photos[name])
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "id,image\n" + "".join(f"{n},{images / n}.png\n" for n in ("room", "human", "toy"))
    )
    out, ledger = tmp_path / "out", tmp_path / "ledger"
    base = [
        "run",
        str(manifest),
        "-p",
        "canny",
        "--output",
        str(out),
        "--ledger",
        str(ledger),
        "--shard-size",
        "2",
    ]

    dry = runner.invoke(app, [*base, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "dry run" in dry.stdout and "0.0018" in dry.stdout
    assert not out.exists() and not ledger.exists()

    first = runner.invoke(app, base)
    assert first.exit_code == 0, first.output
    assert _metric(first.stdout, "guide images made") == "3"
    assert _metric(first.stdout, "cost (USD)") == "0.0018"
    assert sorted(p.name for p in (out / "canny").iterdir()) == ["human.png", "room.png", "toy.png"]

    second = runner.invoke(app, base)
    assert second.exit_code == 0, second.output
    assert _metric(second.stdout, "guide images made") == "0"
    assert _metric(second.stdout, "already in ledger (skipped)") == "3"

    bad = tmp_path / "bad.csv"
    bad.write_text(f"id,image\nroom2,{images / 'room.png'}\nghost,{images / 'ghost.png'}\n")
    failed = runner.invoke(
        app, ["run", str(bad), "-p", "canny", "--output", str(out), "--ledger", str(ledger)]
    )
    assert failed.exit_code == 1, failed.output
    assert _metric(failed.stdout, "guide images made") == "1"
    assert _metric(failed.stdout, "error: objectNotFound") == "1"


def _metric(table: str, name: str) -> str | None:
    """The value cell of the rich summary table row named ``name``."""
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if len(cells) == 2 and cells[0] == name:
            return cells[1]
    return None
